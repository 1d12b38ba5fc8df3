"""The integer CPU path against the fake-quant reference.

Tolerance (documented in arq.quant.execution): one layer given the same input agrees to float
rounding (integer accumulation is exact) and computes identical input codes; through a network,
float-rounding differences may move an activation across a rounding boundary of a later
quantizer and the change propagates. Checked (quant_nets.assert_within_tolerance): in each input, the
first layer whose codes differ shows one-step flips only (at most 32); overall at most 1 % of activation
codes differ, logits differ by at most 5 % of the largest logit, and top-1 agrees on >= 99 % of inputs
whose reference top-2 margin exceeds 1e-3 of the largest logit. Measured on ResNet-20, 128 noisy
inputs, seeds 0-7, uniform 8 / uniform 4 / mixed, float and 8-bit residual streams, both
convolution kernels (2026-11-28): 0.002-0.61 % of codes differ (mixed, seed 5: 0.61 %), first
differences always one step and at most 23 in one input, max logit error 0-3.5 %.
"""
import os

import pytest
import torch
from torch import nn

import arq.quant as quant
from arq import ops
from arq.quant import LayerBits, Policy, QuantConv2d, QuantLinear
from arq.quant.execution import (IntegerConv2d, IntegerExecutionConfig, IntegerLinear, StreamCodes, cpu_has_vnni,
                                 to_integer)
from quant_nets import (assert_compiled_matches_eager, assert_within_tolerance, cifar_resnet, codes_by_layer,
                        mixed_resnet_policy)

pytestmark = pytest.mark.skipif(
    "onednn" not in torch.backends.quantized.supported_engines, reason="needs torch's oneDNN quantized engine"
)


@pytest.fixture(autouse=True)
def _onednn_unless_named(monkeypatch):
    """oneDNN for every convolution unless a test names ``conv_kernel``: most tests here pin oneDNN's
    own paths (prepacked weights, in-place adds), which the default "auto" would route through
    arq::lowbit_conv2d on an AVX2 host; "arq" and "auto" are tested where named."""
    monkeypatch.setenv("ARQ_CONV_KERNEL", "onednn")


def _calibrated_layer(layer, bits, x, signed):
    quantizer = layer.input_quantizer
    quantizer.start_calibration()
    layer(x if signed else x.relu())
    quantizer.finish_calibration()
    assert bool(quantizer.signed) == signed
    return layer.eval()


CASES = [(w, a, s) for w, a in [(2, 2), (3, 5), (4, 4), (5, 7), (7, 8), (8, 7), (8, 8), (6, 3)] for s in (False, True)]


@pytest.mark.parametrize("conv_kernel", ["onednn", "arq"])
@pytest.mark.parametrize("w_bits,a_bits,signed", CASES)
def test_integer_conv_matches_fake_quant_layer(w_bits, a_bits, signed, conv_kernel):
    generator = torch.Generator().manual_seed(w_bits * 100 + a_bits * 10 + signed)
    conv = nn.Conv2d(24, 20, 3, stride=2, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator))
        conv.bias.copy_(torch.randn(20, generator=generator))
    x = torch.randn(8, 24, 15, 15, generator=generator)
    layer = _calibrated_layer(QuantConv2d.from_float(conv, LayerBits(w_bits, a_bits)), LayerBits(w_bits, a_bits), x, signed)
    x = x if signed else x.relu()
    integer = IntegerConv2d(layer, conv_kernel=conv_kernel)
    with torch.no_grad():
        reference = layer(x)
        result = integer(x)
    # arq::lowbit_conv2d takes every layer on its int32 paths (VNNI), on AVX2 those whose vpmaddubsw
    # pair sums fit int16 (not 8x8 bits)
    assert integer.lowbit == (conv_kernel == "arq" and ops_have_lowbit() and not integer.split and (
        ops.cpu_isa() != "avx2" or 2 * integer.code_max * 2 ** (w_bits - 1) <= 32767))
    assert integer.code_max <= 255 and integer.code_min >= 0
    assert integer.split == (w_bits == 8 and a_bits == 8 and not cpu_has_vnni())
    torch.testing.assert_close(result, reference, rtol=0, atol=2e-5 * float(reference.abs().max()))
    codes = integer.codes(x).to(torch.int32) - integer.zero_point
    expected = torch.round(layer.input_quantizer(x) / layer.input_quantizer.scale).to(torch.int32)
    assert torch.equal(codes, expected)


def ops_have_lowbit() -> bool:
    from arq.ops import _has_kernel

    return _has_kernel("lowbit_conv2d", "CPU")


@pytest.mark.parametrize("split", ["always", "never"])
def test_8_bit_split_is_exact(split):
    generator = torch.Generator().manual_seed(7)
    linear = nn.Linear(300, 12)
    x = torch.randn(64, 300, generator=generator).relu()
    layer = _calibrated_layer(QuantLinear.from_float(linear, LayerBits(8, 8)), None, x, False)
    integer = IntegerLinear(layer, split)
    with torch.no_grad():
        reference = layer(x)
        result = integer(x)
    assert integer.split == (split == "always")
    if split == "never" and not cpu_has_vnni():
        pytest.skip("without VNNI an unsplit 8x8-bit product pair may saturate: nothing to assert")
    torch.testing.assert_close(result, reference, rtol=0, atol=2e-5 * float(reference.abs().max()))


@pytest.mark.parametrize("w_bits,a_bits,signed", [(4, 4, False), (8, 8, False), (3, 6, True), (8, 8, True)])
def test_integer_linear_matches_fake_quant_layer(w_bits, a_bits, signed):
    generator = torch.Generator().manual_seed(w_bits + a_bits)
    linear = nn.Linear(64, 10)
    x = torch.randn(32, 64, generator=generator)
    layer = _calibrated_layer(QuantLinear.from_float(linear, LayerBits(w_bits, a_bits)), None, x, signed)
    x = x if signed else x.relu()
    with torch.no_grad():
        reference = layer(x)
        result = IntegerLinear(layer)(x)
    torch.testing.assert_close(result, reference, rtol=0, atol=2e-5 * float(reference.abs().max()))


def _integer_codes(model, x, shortcuts: bool = False):
    """Per integer layer, its input codes minus the zero point (what the fake-quant codes are); with
    ``shortcuts``, also each downsampling shortcut's stream codes minus theirs (``codes_by_layer``)."""
    def shortcut_codes(name, module, out):
        if isinstance(module, IntegerConv2d) and module.writes_stream and ".downsample." in name:
            return name.split(".downsample.")[0], out.to(torch.int32) - module.output_codes[1]
        if isinstance(module, StreamCodes) and name.endswith(".shortcut_quantizer"):
            # no convolution wrote this shortcut's stream (a split one, say): its quantizer did
            return name.rsplit(".", 1)[0], out.to(torch.int32) - module.zero_point
        return None

    return codes_by_layer(model, x, (IntegerConv2d, IntegerLinear),
                          lambda m, x: m.input_codes(x).to(torch.int32) - m.zero_point,
                          shortcut_codes if shortcuts else None)


# seed 5 is the widest spread measured: 0.61 % of the mixed policy's codes differ
@pytest.mark.parametrize("seed", [0, 5])
@pytest.mark.parametrize("policy_name", ["uniform8", "uniform4", "mixed", "uniform8_r8"])
def test_integer_resnet_agrees_with_fake_quant_reference(policy_name, seed):
    """The integer model (default kernels) within the documented tolerance of fake-quant, per code;
    with the 8-bit residual stream (the fastest CPU model) the downsampling shortcuts' codes, which
    no layer reads as its input, are compared too."""
    model = cifar_resnet(20)
    policy = {"uniform8": lambda m: Policy.uniform(m, 8, 8), "uniform4": lambda m: Policy.uniform(m, 4, 4),
              "mixed": mixed_resnet_policy, "uniform8_r8": lambda m: Policy.uniform(m, 8, 8)}[policy_name](model)
    stream = policy_name.endswith("r8")
    generator = torch.Generator().manual_seed(seed)
    calibration = torch.rand(64, 3, 32, 32, generator=generator)
    qmodel = quant.quantize(model, policy, calibration, config=quant.QuantConfig(residual_bits=8 if stream else 32))
    integer = to_integer(qmodel)
    assert integer.arq_metadata == model.arq_metadata
    x = torch.rand(128, 3, 32, 32, generator=generator) + 0.25 * torch.randn(128, 3, 32, 32, generator=generator)
    reference, reference_codes = codes_by_layer(qmodel, x, shortcut_codes=stream)
    result, integer_codes = _integer_codes(integer, x, shortcuts=stream)
    layers = {n for n, b in policy.items() if b.w_bits != 32 and b.a_bits != 32}
    shortcuts = {f"{n.split('.downsample.')[0]}.shortcut" for n in layers if ".downsample." in n} if stream else set()
    # without VNNI the 8-bit layers run as two convolutions (split), which no epilogue is fused into:
    # the stem and the downsampling shortcuts write float32, and the streams' quantizers the codes
    # (the stem's stream too, then: the first block's shortcut)
    split = any(isinstance(m, IntegerConv2d) and m.split for m in integer.modules())
    assert split == (policy_name in ("uniform8", "uniform8_r8", "mixed") and not cpu_has_vnni())
    stem_stream = {f"{n.rsplit('.', 1)[0]}.shortcut" for n, m in integer.named_modules()
                   if isinstance(m, StreamCodes) and n.endswith(".shortcut_quantizer")} - shortcuts
    assert stem_stream == ({"1.layer1.0.shortcut"} if stream and split else set())
    assert set(integer_codes) == layers | shortcuts | stem_stream and (len(shortcuts) == 2 or not stream)
    assert_within_tolerance(result, reference, integer_codes, reference_codes, 100)


@pytest.mark.parametrize("seed", [0, 5])
@pytest.mark.parametrize("case", ["uniform4", "uniform4_r8", "mixed", "uniform8_r8"])
def test_lowbit_kernel_resnet_agrees_with_onednn_and_fake_quant(case, seed):
    """``conv_kernel="arq"``: the block convolutions run arq::lowbit_conv2d (codes out, float residual
    in, 8-bit stream in and out, shortcut stream codes out) and the network stays within the module's tolerance of the
    fake-quant reference, as the oneDNN model does. W8A8 runs there only on the op's int32 paths (VNNI)."""
    if not ops_have_lowbit():
        pytest.skip("arq._C without lowbit_conv2d")
    if case == "uniform8_r8" and not ops.lowbit_conv_supported(255, 8):
        pytest.skip("8 x 8 bits need the op's VNNI path; this CPU's is AVX2")
    model = cifar_resnet(20)
    policy = (mixed_resnet_policy(model) if case == "mixed"
              else Policy.uniform(model, 8, 8) if case == "uniform8_r8" else Policy.uniform(model, 4, 4))
    generator = torch.Generator().manual_seed(seed)
    qmodel = quant.quantize(model, policy, torch.rand(64, 3, 32, 32, generator=generator),
                            config=quant.QuantConfig(residual_bits=8 if case.endswith("r8") else 32))
    lowbit = to_integer(qmodel, IntegerExecutionConfig(conv_kernel="arq"))
    onednn = to_integer(qmodel, IntegerExecutionConfig(conv_kernel="onednn"))
    layers = [m for m in lowbit.modules() if isinstance(m, IntegerConv2d)]
    assert sum(m.lowbit for m in layers) >= 18 and not any(m.lowbit for m in onednn.modules()
                                                           if isinstance(m, IntegerConv2d))
    assert any(m.lowbit and m.output_codes is not None for m in layers)
    if case.endswith("r8"):
        assert any(m.lowbit and m.stream_output is not None for m in layers)
        # the stem and the 1x1 shortcuts write stream codes (signed, zero point 128, for the shortcuts)
        assert sum(m.lowbit and m.writes_stream for m in layers) == 3
    else:
        assert any(m.lowbit and m.residual_relu is not None for m in layers)
    x = torch.rand(128, 3, 32, 32, generator=generator) + 0.25 * torch.randn(128, 3, 32, 32, generator=generator)
    # the downsampling shortcuts' codes too: with the 8-bit stream a flipped step there is several
    # steps of the stream, so without them an input's first recorded difference may exceed a step
    reference, reference_codes = codes_by_layer(qmodel, x, shortcut_codes=True)
    result, integer_codes = _integer_codes(lowbit, x, shortcuts=case.endswith("r8"))
    assert_within_tolerance(result, reference, integer_codes, reference_codes, 100)
    with torch.no_grad():
        expected = onednn(x)
    torch.testing.assert_close(result, expected, rtol=0, atol=0.05 * float(expected.abs().max()))


def test_conv_kernel_is_checked_and_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("ARQ_CONV_KERNEL", "arq")
    assert IntegerExecutionConfig().conv_kernel == "arq"
    monkeypatch.setenv("ARQ_CONV_KERNEL", "fastest")
    with pytest.raises(ValueError, match="ARQ_CONV_KERNEL"):
        IntegerExecutionConfig()
    monkeypatch.delenv("ARQ_CONV_KERNEL")
    assert IntegerExecutionConfig().conv_kernel == "auto"


@pytest.mark.parametrize("isa", ["auto", "scalar", "avx2"])
def test_auto_conv_kernel_takes_lowbit_for_kxk_layers_where_preferred(isa, monkeypatch):
    """The default ``conv_kernel="auto"``: arq::lowbit_conv2d for the eligible k x k convolutions
    (k > 1) where :func:`lowbit_conv_preferred` (AVX2 without VNNI or AVX-512, or any CPU under
    ``ARQ_CPU_ISA=avx2``), oneDNN for the 1x1 ones and everywhere else (here forced by
    ``ARQ_CPU_ISA=scalar``); same tolerance either way."""
    from arq.ops import cpu_isa
    from arq.quant.execution import lowbit_conv_preferred

    monkeypatch.delenv("ARQ_CONV_KERNEL")
    monkeypatch.setenv("ARQ_CPU_ISA", isa)
    model = cifar_resnet(20)
    generator = torch.Generator().manual_seed(8)
    qmodel = quant.quantize(model, Policy.uniform(model, 4, 4), torch.rand(32, 3, 32, 32, generator=generator))
    integer = to_integer(qmodel)
    preferred = {channels: lowbit_conv_preferred(channels) for channels in (6, 16, 32, 64)}
    if isa == "scalar":
        assert not any(preferred.values())
    if isa == "avx2" and cpu_isa() == "avx2":  # the extension built, on a CPU with AVX2: every k x k layer
        assert set(preferred.values()) == {ops_have_lowbit()}
    if cpu_isa() == "vnni":  # AVX-512 VNNI: the k x k layers of 16 or 32 output channels
        assert preferred == {6: False, 16: ops_have_lowbit(), 32: ops_have_lowbit(), 64: False}
    convs = [m for m in integer.modules() if isinstance(m, IntegerConv2d)]
    assert any(m.kernel_size == 1 for m in convs) and any(m.kernel_size == 3 for m in convs)
    assert all(m.lowbit == (m.kernel_size > 1 and preferred[m.w_scale.shape[0]]) for m in convs)
    x = torch.rand(32, 3, 32, 32, generator=generator) + 0.25 * torch.randn(32, 3, 32, 32, generator=generator)
    reference, reference_codes = codes_by_layer(qmodel, x)
    result, integer_codes = _integer_codes(integer, x)
    assert_within_tolerance(result, reference, integer_codes, reference_codes, 20)


@pytest.mark.slow
def test_compiled_lowbit_model_matches_eager():
    if not ops_have_lowbit():
        pytest.skip("arq._C without lowbit_conv2d")
    model = cifar_resnet(20)
    generator = torch.Generator().manual_seed(6)
    qmodel = quant.quantize(model, Policy.uniform(model, 4, 4), torch.rand(32, 3, 32, 32, generator=generator),
                            config=quant.QuantConfig(residual_bits=8))
    config = dict(conv_kernel="arq", fuse_residuals=False)
    eager = to_integer(qmodel, IntegerExecutionConfig(**config))
    compiled = to_integer(qmodel, IntegerExecutionConfig(compile=True, **config))
    assert_compiled_matches_eager(eager, compiled, torch.rand(8, 3, 32, 32, generator=generator))


@pytest.mark.parametrize("residual_bits", [32, 8])
def test_eager_codes_come_from_the_cpp_op_and_equal_the_torch_formula(residual_bits, monkeypatch):
    """Eager integer models quantize float activations with ``arq::quantize_codes`` (one pass) where
    the C++ ops are built; the logits equal those of the torch formula bit for bit."""
    from arq import ops
    import arq.quant.execution as execution

    if not ops._has_kernel("quantize_codes", "CPU"):
        pytest.skip("arq._C not built")
    model = cifar_resnet(20)
    generator = torch.Generator().manual_seed(3)
    qmodel = quant.quantize(model, Policy.uniform(model, 4, 4), torch.rand(64, 3, 32, 32, generator=generator),
                            config=quant.QuantConfig(residual_bits=residual_bits))
    integer = to_integer(qmodel)
    x = torch.rand(64, 3, 32, 32, generator=generator) + 0.25 * torch.randn(64, 3, 32, 32, generator=generator)
    calls, original = [], torch.ops.arq.quantize_codes
    counted = lambda *args: calls.append(1) or original(*args)  # noqa: E731
    with torch.no_grad():
        monkeypatch.setattr(torch.ops.arq, "quantize_codes", counted, raising=False)
        with_op = integer(x)
        monkeypatch.setattr(execution, "_has_quantize_kernel", lambda: False)
        with_torch = integer(x)
    # float stream: the stem's input, conv1 of the 9 blocks, the 2 shortcut convs, the final linear;
    # 8-bit stream: the stem's input and the final linear (the stem and the 2 shortcut convs write
    # stream codes, every block adds two code tensors in oneDNN)
    assert len(calls) == (1 + 9 + 2 + 1 if residual_bits == 32 else 1 + 1)
    assert torch.equal(with_op, with_torch)


def test_to_integer_rejects_float_and_non_cpu_models():
    with pytest.raises(ValueError, match="no quantized layer"):
        to_integer(cifar_resnet(20))
    with pytest.raises(ValueError, match="split_8bit"):
        IntegerExecutionConfig(split_8bit="sometimes")


@pytest.mark.slow
def test_compiled_integer_model_matches_eager():
    """One graph per batch size: the linear layers (oneDNN qlinear behind arq::onednn_linear)
    no longer break it, which made torch.compile trace every layer alone (LeNet: past the
    recompile limit)."""
    import torch._dynamo

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4),
    ).eval()
    x = torch.rand(16, 3, 16, 16)
    qmodel = quant.quantize(model, Policy.uniform(model, 4, 8), x)
    eager = to_integer(qmodel)
    compiled = to_integer(qmodel, IntegerExecutionConfig(compile=True))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        for batch in (x, x[:5]):
            expected = eager(batch)
            result = compiled(batch)
            torch.testing.assert_close(result, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))
    assert not torch._dynamo.utils.counters["graph_break"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2


@pytest.mark.slow
def test_compiled_integer_models_each_keep_their_own_recompile_budget():
    """Dynamo allows ``recompile_limit`` compiled variants per code object, and compiles every
    nn.Module through one wrapper of torch's: the third model past a limit of 2 then ran eagerly.
    CompiledIntegerModel traces a function of its own per instance, so each model compiles."""
    import torch._dynamo

    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4)).eval()
    x = torch.rand(8, 3, 8, 8)
    qmodels = [quant.quantize(model, Policy.uniform(model, bits, bits), x) for bits in (4, 6, 8)]
    compiled = [to_integer(q, IntegerExecutionConfig(compile=True)) for q in qmodels]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=2):
        for qmodel, candidate in zip(qmodels, compiled):
            for batch in (x, x[:3]):  # two variants each: within each model's own limit
                result, reference = candidate(batch), qmodel(batch)
                torch.testing.assert_close(result, reference, rtol=0, atol=0.05 * float(reference.abs().max()))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 6


def _chained(model):
    return [m for m in model.modules() if isinstance(m, IntegerConv2d) and m.output_codes is not None]


@pytest.mark.parametrize("policy_name", ["uniform4", "mixed"])
def test_resnet_blocks_chain_conv1_into_conv2(policy_name):
    model = cifar_resnet(20)
    policy = Policy.uniform(model, 4, 4) if policy_name == "uniform4" else mixed_resnet_policy(model)
    generator = torch.Generator().manual_seed(3)
    qmodel = quant.quantize(model, policy, torch.rand(64, 3, 32, 32, generator=generator))
    plain = to_integer(qmodel, IntegerExecutionConfig(fuse_epilogues=False))
    chained = to_integer(qmodel)
    assert not _chained(plain)
    producers = {id(m) for m in _chained(chained)}
    blocks = [m for m in chained.modules() if hasattr(m, "conv1") and hasattr(m, "conv2")]
    expected = [b for b in blocks if isinstance(b.conv1, IntegerConv2d) and isinstance(b.conv2, IntegerConv2d)
                and not b.conv1.split]
    assert len(expected) >= 5 and producers == {id(b.conv1) for b in expected}
    assert all(b.conv2.takes_codes for b in expected)
    assert all(b.conv2.residual_relu is True for b in expected)  # the add and ReLU after conv2 moved in too
    assert chained.arq_metadata == model.arq_metadata
    x = torch.rand(128, 3, 32, 32, generator=generator) + 0.25 * torch.randn(128, 3, 32, 32, generator=generator)
    unchained_logits, unchained_codes = _integer_codes(plain, x)
    logits, codes = _integer_codes(chained, x)
    assert set(codes) == set(unchained_codes)
    differing = sum(int((codes[name] != unchained_codes[name]).sum()) for name in codes)
    assert differing <= 1e-3 * sum(c.numel() for c in codes.values())
    assert float((logits - unchained_logits).abs().max()) <= 0.05 * float(unchained_logits.abs().max())


@pytest.mark.parametrize("w_bits,a_bits", [(2, 2), (3, 5), (4, 4), (5, 7), (6, 3), (7, 8), (8, 6)])
@pytest.mark.parametrize("with_relu", [True, False])
def test_chained_codes_are_the_next_layers_codes(w_bits, a_bits, with_relu):
    """conv -> [ReLU] -> conv: the first conv writes exactly the codes the second would compute
    (up to a float tie), for unsigned (after ReLU) and signed (no ReLU) consumers."""
    generator = torch.Generator().manual_seed(w_bits * 10 + a_bits + 100 * with_relu)
    model = nn.Sequential(nn.Conv2d(5, 12, 3, padding=1), nn.ReLU() if with_relu else nn.Identity(),
                          nn.Conv2d(12, 7, 3, stride=2, padding=1)).eval()
    x = torch.randn(40, 5, 11, 13, generator=generator)
    policy = Policy({"0": LayerBits(w_bits, 8 if w_bits < 8 else 7), "2": LayerBits(w_bits, a_bits)})
    qmodel = quant.quantize(model, policy, x)
    consumer = qmodel[2]
    assert bool(consumer.input_quantizer.signed) == (not with_relu)
    chained = to_integer(qmodel)
    assert len(_chained(chained)) == 1
    fresh = torch.randn(64, 5, 11, 13, generator=generator)
    with torch.no_grad():
        written = chained.get_submodule("0")(fresh)
        expected = to_integer(qmodel, IntegerExecutionConfig(fuse_epilogues=False)).get_submodule("0")(fresh)
        expected = chained.get_submodule("2").codes(expected.relu() if with_relu else expected)
    assert written.dtype == torch.uint8 and written.shape == expected.shape
    difference = (written.to(torch.int32) - expected.to(torch.int32)).abs()
    assert int(difference.max()) <= 1 and int((difference > 0).sum()) <= 1e-3 * difference.numel()
    assert int(written.min()) >= chained.get_submodule("2").code_min
    assert int(written.max()) <= chained.get_submodule("2").code_max


class _Residual(nn.Module):
    """conv1 -> ReLU feeds conv2 and the residual add (so it cannot be chained)."""

    def __init__(self, read_again: bool = False, input_residual: bool = False, alias_read_again: bool = False):
        super().__init__()
        self.conv1, self.relu, self.conv2 = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)
        self.read_again, self.input_residual, self.alias_read_again = read_again, input_residual, alias_read_again

    def forward(self, x):
        if self.input_residual:
            return self.conv2(torch.relu(self.conv1(x) + x))  # the residual is the caller's tensor
        if self.alias_read_again:  # the residual shares its buffer with ``pre``, read after conv2
            pre = self.conv1(x)
            out = torch.relu_(pre)
            return torch.relu(self.conv2(out) + out) * pre
        out = self.relu(self.conv1(x))
        y = torch.relu(self.conv2(out) + out)
        return y * out if self.read_again else y  # read_again: the residual is read after conv2


def _residual_fused(model):
    return [m for m in model.modules() if isinstance(m, IntegerConv2d) and m.residual_relu is not None]


@pytest.mark.parametrize("case", ["fused", "read_again", "input_residual", "alias_read_again"])
def test_residual_add_moves_into_the_conv_only_where_its_buffer_is_dead(case):
    torch.manual_seed(7)
    model = _Residual(read_again=case == "read_again", input_residual=case == "input_residual",
                      alias_read_again=case == "alias_read_again").eval()
    x = torch.randn(8, 4, 6, 6).relu().contiguous(memory_format=torch.channels_last)
    qmodel = quant.quantize(model, Policy.uniform(model, 4, 6), x)
    fused = to_integer(qmodel)
    unfused = to_integer(qmodel, IntegerExecutionConfig(fuse_epilogues=False))
    assert not _chained(fused)  # conv1's activation has two uses: it stays float
    assert [m.residual_relu for m in _residual_fused(fused)] == ([True] if case == "fused" else [])
    if case == "fused":
        assert "adds the residual, then ReLU" in repr(fused)
    before = x.clone()
    with torch.no_grad():
        expected = unfused(x)
        result = fused(x)
        again = fused(x)
    assert torch.equal(x, before)  # the caller's tensor is never written
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    assert torch.equal(again, result)
    with pytest.raises(TypeError, match="fuse_epilogues"):
        IntegerExecutionConfig(fuse_epilogues="yes")


@pytest.mark.slow
def test_compiled_fused_resnet_matches_eager():
    """torch.compile functionalizes the residual add's in-place oneDNN op: same logits as eager."""
    model = cifar_resnet(8)
    generator = torch.Generator().manual_seed(5)
    qmodel = quant.quantize(model, Policy.uniform(model, 4, 4), torch.rand(32, 3, 32, 32, generator=generator))
    eager = to_integer(qmodel)
    assert _chained(eager) and _residual_fused(eager)
    compiled = to_integer(qmodel, IntegerExecutionConfig(compile=True, fuse_residuals=True))
    assert IntegerExecutionConfig(compile=True).residuals_fused is False  # the default when compiling
    assert_compiled_matches_eager(eager, compiled, torch.rand(24, 3, 32, 32, generator=generator))


# ----------------------------------------------------------------------------- entry at the input codes
def _arq_normalized_resnet(seed=0):
    """quant_nets' ResNet behind arq's own NormalizeLayer (whose float32 arithmetic the noise reproduces)."""
    from arq.models.normalize import NormalizeLayer
    from quant_nets import CifarResNet, randomize_batchnorm

    torch.manual_seed(seed)
    model = nn.Sequential(NormalizeLayer([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]), CifarResNet(20))
    randomize_batchnorm(model, torch.Generator().manual_seed(seed))
    model.arq_metadata = {"sigma": 0.25, "num_classes": 10, "dataset": "cifar10", "arch": "cifar_resnet20"}
    return model.eval()


def _noisy_images(count, seed=3):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, 3, 32, 32, generator=generator) + 0.25 * torch.randn(count, 3, 32, 32, generator=generator)


@pytest.mark.parametrize("normalized", ["arq", "own", "raw"], ids=["NormalizeLayer", "own-normalization", "raw"])
@pytest.mark.parametrize("bits,residual_bits", [((8, 8), 8), ((4, 4), 32), ((3, 5), 8)])
def test_entered_at_its_input_codes_the_integer_model_computes_the_same_logits(normalized, bits, residual_bits):
    """arq's NormalizeLayer, a model's own ``(x - mean) / std`` module (quant_nets.Normalize), or none."""
    from arq.quant.execution import enter_at_input_codes
    from quant_nets import Normalize

    model = _arq_normalized_resnet()
    if normalized == "own":
        model = nn.Sequential(Normalize([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]), model[1])
        model.arq_metadata = {"sigma": 0.25, "num_classes": 10}
    elif normalized == "raw":
        model = nn.Sequential(model[1])
        model.arq_metadata = {"sigma": 0.25, "num_classes": 10}
    calibration = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    qmodel = quant.quantize(model, Policy.uniform(model, *bits), calibration,
                            config=quant.QuantConfig(residual_bits=residual_bits))
    floats, entered = to_integer(qmodel), to_integer(qmodel)
    codes = enter_at_input_codes(entered)
    assert codes is not None
    stem = next(m for m in entered.modules() if isinstance(m, IntegerConv2d))
    assert stem.takes_codes and "takes codes" in repr(stem)
    quantizer = qmodel.get_submodule("0.conv1" if normalized == "raw" else "1.conv1").input_quantizer
    assert codes.scale == float(quantizer.scale) and codes.code_max - codes.code_min == quantizer.levels[1] - quantizer.levels[0]
    if normalized != "raw":
        assert codes.mean == tuple(float(v) for v in qmodel[0].mean.flatten())
        assert codes.std == tuple(float(v) for v in qmodel[0].std.flatten())
    if normalized == "arq":
        assert isinstance(entered[0], nn.Identity)
    elif normalized == "raw":
        assert codes.mean == (0.0, 0.0, 0.0) and codes.std == (1.0, 1.0, 1.0)
    x = _noisy_images(48)
    with torch.no_grad():
        assert torch.equal(entered(codes.encode(x)), floats(x))
    assert enter_at_input_codes(entered) is None  # already entered at its codes


class _Standardize(nn.Module):
    """A model's own normalization written some way: ``(x - mean) / std`` is recognized, the rest is not."""

    def __init__(self, how: str, channels: int = 3):
        super().__init__()
        self.how = how
        self.register_buffer("mean", torch.linspace(0.4, 0.5, channels).view(1, -1, 1, 1))
        std = torch.linspace(0.2, 0.3, channels)
        if how == "zero std":
            std[1] = 0.0
        self.register_buffer("std", std.view(-1, 1, 1) if how == "[C, 1, 1]" else std.view(1, -1, 1, 1))
        if how == "float64":
            self.mean = self.mean.double()

    def forward(self, x):
        if self.how in ("standard", "[C, 1, 1]", "zero std", "float64"):
            return (x - self.mean) / self.std
        if self.how == "torch functions":
            return torch.div(torch.sub(x, self.mean), self.std)
        if self.how == "times inverse":
            return (x - self.mean) * (1.0 / self.std)
        if self.how == "then clamp":
            return ((x - self.mean) / self.std).clamp(-3, 3)
        if self.how == "checks shape":
            if x.shape[1] != 3:
                raise ValueError("three channels")
            return (x - self.mean) / self.std
        raise AssertionError(self.how)


def test_normalization_values_recognize_exactly_the_standardization():
    from arq.models.normalize import NormalizeLayer
    from arq.quant.execution import normalization_values

    mean = tuple(float(v) for v in torch.linspace(0.4, 0.5, 3))
    std = tuple(float(v) for v in torch.linspace(0.2, 0.3, 3))
    for how in ("standard", "[C, 1, 1]", "torch functions"):
        assert normalization_values(_Standardize(how)) == (mean, std), how
    for how in ("times inverse", "then clamp", "checks shape", "zero std", "float64"):
        assert normalization_values(_Standardize(how)) is None, how
    layer = NormalizeLayer([0.1307], [0.3081])
    assert normalization_values(layer) == ((float(layer.mean),), (float(layer.std),))
    assert normalization_values(nn.Identity()) is None and normalization_values(nn.BatchNorm2d(3)) is None


class _InlineStandardization(nn.Module):
    """The standardization inside a forward that is not a graph: it cannot be taken out."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 0.5))
        self.register_buffer("std", torch.full((1, 3, 1, 1), 0.25))
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv((x - self.mean) / self.std)).mean((2, 3)))


class _InputReadTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc((self.conv(x) + x.mean()).mean((2, 3)))


def test_models_whose_input_goes_elsewhere_keep_their_float_entry():
    from arq.quant import LayerBits
    from arq.quant.execution import enter_at_input_codes

    calibration = torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    twice, inline = _InputReadTwice().eval(), _InlineStandardization().eval()
    float_stem = _arq_normalized_resnet()
    bits = {name: LayerBits(8, 8) for name, _ in quant.quantizable_layers(float_stem)}
    bits["1.conv1"] = LayerBits(32, 8)  # the stem stays a fake-quant float layer
    for model, policy in ((twice, Policy.uniform(twice, 8, 8)), (float_stem, Policy(bits)),
                          (inline, Policy.uniform(inline, 8, 8))):
        integer = to_integer(quant.quantize(model, policy, calibration))
        before = repr(integer)
        assert enter_at_input_codes(integer) is None
        assert repr(integer) == before


def test_compiled_model_entered_at_its_input_codes_matches_eager():
    """As the engine runs it: the integer model entered at its codes, then compiled, fed uint8 NHWC codes."""
    from arq.quant.execution import CompiledIntegerModel, enter_at_input_codes

    model = _arq_normalized_resnet(seed=2)
    calibration = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    qmodel = quant.quantize(model, Policy.uniform(model, 8, 8), calibration, config=quant.QuantConfig(residual_bits=8))
    eager = to_integer(qmodel)
    codes = enter_at_input_codes(eager)
    compiled = CompiledIntegerModel(eager, dynamic=False)
    assert_compiled_matches_eager(eager, compiled, codes.encode(_noisy_images(32, seed=5)))


_SATURATION_SCRIPT = """
import torch
from torch import nn
from arq.quant import LayerBits, QuantConv2d
from arq.quant.execution import IntegerConv2d, cpu_has_vnni
conv = nn.Conv2d(32, 8, 3, padding=1, bias=False)
with torch.no_grad():
    conv.weight.fill_(1.0)  # every weight code 127, every input code 255: pair sums past int16
layer = QuantConv2d.from_float(conv, LayerBits(8, 8))
x = torch.ones(2, 32, 6, 6)
layer.input_quantizer.start_calibration(); layer(x); layer.input_quantizer.finish_calibration(); layer.eval()
with torch.no_grad():
    reference = layer(x)
    auto, never = IntegerConv2d(layer, "auto", "onednn"), IntegerConv2d(layer, "never", "onednn")
    print(int(cpu_has_vnni()), int(auto.split), float((auto(x) - reference).abs().max()),
          float((never(x) - reference).abs().max()), float(reference.abs().max()))
"""


def test_onednn_capped_below_vnni_splits_8_bit_layers():
    """``ONEDNN_MAX_CPU_ISA=AVX2`` makes oneDNN's u8 x s8 kernels add byte pairs in saturating int16
    on any CPU: the "auto" split must see that (not only /proc/cpuinfo), or an 8x8-bit layer whose
    codes fill their range comes out wrong. In a fresh process, as oneDNN reads the cap once."""
    import subprocess
    import sys

    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ARQ_CONV_KERNEL": "onednn"}
    run = subprocess.run([sys.executable, "-c", _SATURATION_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300, check=True)
    has_vnni, split, auto_error, never_error, scale = run.stdout.split()
    assert (has_vnni, split) == ("0", "1")
    assert float(auto_error) <= 1e-6 * float(scale)
    assert float(never_error) > 0.1 * float(scale)  # the unsplit layer saturates: the cap is in force


def test_cpu_has_vnni_reads_the_onednn_cap(monkeypatch):
    from arq.quant import execution

    monkeypatch.setattr(execution, "_cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_vnni"}))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    assert execution.cpu_has_vnni()
    for cap, expected in [("AVX2", False), ("avx512_core", False), ("AVX512_CORE_VNNI", True), ("ALL", True)]:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert execution.cpu_has_vnni() == expected, cap
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX2")
    assert not execution.cpu_has_vnni()
    monkeypatch.setattr(execution, "_cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.delenv("DNNL_MAX_CPU_ISA")
    assert not execution.cpu_has_vnni()


def test_integer_layers_compute_the_reference_codes_at_every_width():
    """Every (w_bits, a_bits) in 2..8, signed and unsigned inputs, a grouped, dilated, strided
    conv (oneDNN) and a linear: the integer layer's input codes are the fake-quant codes exactly
    (zero point 2^(a-1) for a signed input, padding included) and its output agrees to float
    rounding."""
    generator = torch.Generator().manual_seed(11)
    for w_bits in range(2, 9):
        for a_bits in range(2, 9):
            for signed in (False, True):
                conv = nn.Conv2d(6, 4, 3, stride=2, padding=2, dilation=2, groups=2)
                linear = nn.Linear(13, 5)
                for float_layer, quant_type, integer_type, shape in (
                        (conv, QuantConv2d, IntegerConv2d, (3, 6, 9, 9)), (linear, QuantLinear, IntegerLinear, (9, 13))):
                    with torch.no_grad():
                        float_layer.weight.copy_(torch.randn(float_layer.weight.shape, generator=generator))
                    calibration, x = (2 * torch.randn(shape, generator=generator) for _ in range(2))
                    if not signed:
                        calibration, x = calibration.relu(), x.relu()
                    layer = _calibrated_layer(quant_type.from_float(float_layer, LayerBits(w_bits, a_bits)), None,
                                              calibration, signed)
                    integer = integer_type(layer)
                    with torch.no_grad():
                        reference, result = layer(x), integer(x)
                    expected = torch.round(layer.input_quantizer(x) / layer.input_quantizer.scale).to(torch.int32)
                    case = (w_bits, a_bits, signed, quant_type.__name__)
                    assert torch.equal(integer.codes(x).to(torch.int32) - integer.zero_point, expected), case
                    assert integer.zero_point == (1 << (a_bits - 1) if signed else 0), case
                    torch.testing.assert_close(result, reference, rtol=0, atol=2e-5 * float(reference.abs().max()))


@pytest.mark.parametrize("bits, residual_bits", [((4, 4), 8), ((4, 4), 32), ((8, 8), 8)])
def test_cpu_chunks_follow_the_models_activations_without_avx512(monkeypatch, bits, residual_bits):
    """Without AVX-512 an integer model whose every convolution writes uint8 codes gets whole batches
    (measured faster there); float32 activations anywhere (a float stream, split 8x8-bit layers) and
    float models keep the 128-sample chunks. With AVX-512 every model gets whole batches."""
    from arq.quant import execution
    from arq.smoothing import engine

    model = cifar_resnet(20)
    qmodel = quant.quantize(model, Policy.uniform(model, *bits), torch.rand(16, 3, 32, 32),
                            config=quant.QuantConfig(residual_bits=residual_bits))
    integer = to_integer(qmodel)
    convs = [m for m in integer.modules() if isinstance(m, IntegerConv2d)]
    throughout = execution.writes_codes_throughout(integer)
    expected = residual_bits == 8 and not any(m.split for m in convs)
    assert throughout == expected and (bits != (4, 4) or throughout == (residual_bits == 8))
    monkeypatch.delenv("ARQ_CPU_CHUNK", raising=False)
    monkeypatch.setattr(execution, "_cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert engine.cpu_chunk(integer) == (0 if expected else 128)
    assert engine.cpu_chunk(model) == engine.cpu_chunk(qmodel) == engine.cpu_chunk() == 128
    assert engine.cpu_chunk(torch.compile(integer)) == engine.cpu_chunk(integer)  # sees through the wrapper
    monkeypatch.setenv("ARQ_CPU_CHUNK", "64")
    assert engine.cpu_chunk(integer) == 64
    monkeypatch.delenv("ARQ_CPU_CHUNK")
    monkeypatch.setattr(execution, "_cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512bw"}))
    assert engine.cpu_chunk(integer) == engine.cpu_chunk(model) == 0
