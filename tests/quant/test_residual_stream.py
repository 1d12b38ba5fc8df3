"""The quantized residual stream (QuantConfig.residual_bits): the fake-quant model, its file, and the
integer CPU model that keeps the stream as uint8 (oneDNN's conv adds it and writes the next codes).

The integer model is held to the tolerance of tests/quant/test_quant_execution.py (documented in
arq.quant.execution): at most 0.5 % of activation codes differ, logits within 5 % of the largest,
top-1 equal on >= 99 % of clearly decided inputs.
"""
import pytest
import torch
from torch import nn

import arq
import arq.quant as quant
from arq.quant import Policy, QuantConfig, execution
from arq.quant.execution import IntegerConv2d, IntegerExecutionConfig, IntegerLinear, StreamCodes, to_integer
from arq.quant.kernels import PackedConv2d, PackedLinear, resolve_backend
from arq.quant.quantizers import ActivationQuantizer
from arq.quant.residual import RESIDUAL_QUANTIZER, SHORTCUT_QUANTIZER, residual_blocks
from quant_nets import assert_compiled_matches_eager, assert_within_tolerance, cifar_resnet, codes_by_layer

needs_onednn = pytest.mark.skipif(
    "onednn" not in torch.backends.quantized.supported_engines, reason="needs torch's oneDNN quantized engine"
)
RESNET20_BLOCKS = [f"1.layer{stage}.{index}" for stage in (1, 2, 3) for index in range(3)]
# the first block (entered from the stem) and the 2 downsampling blocks
RESNET20_SHORTCUTS = ["1.layer1.0", "1.layer2.0", "1.layer3.0"]


@pytest.fixture(autouse=True)
def _onednn_unless_named(monkeypatch):
    """oneDNN's stream paths (in-place adds, the compiled copy) unless a test names ``conv_kernel``:
    the default "auto" would route the 3x3 convolutions through arq::lowbit_conv2d on an AVX2 host
    (its stream epilogue is tested in test_quant_execution.py and tests/kernels)."""
    monkeypatch.setenv("ARQ_CONV_KERNEL", "onednn")


def _quantized(model, residual_bits=8, bits=(4, 4), seed=0, shortcuts=True):
    calibration = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return quant.quantize(model, Policy.uniform(model, *bits), calibration,
                          config=QuantConfig(residual_bits=residual_bits, residual_shortcuts=shortcuts))


def _noisy(count, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, 3, 32, 32, generator=generator) + 0.25 * torch.randn(count, 3, 32, 32,
                                                                                  generator=generator)


@pytest.mark.parametrize("bad", [1, 9, 16, True, "8", 8.0])
def test_residual_bits_must_be_a_bit_width(bad):
    with pytest.raises(ValueError, match="residual_bits"):
        QuantConfig(residual_bits=bad)
    assert QuantConfig().residual_bits == 32 and QuantConfig(residual_bits=2).residual_bits == 2
    with pytest.raises(TypeError, match="residual_shortcuts"):
        QuantConfig(residual_shortcuts="yes")


def test_blocks_are_the_modules_returning_a_residual_add():
    assert residual_blocks(cifar_resnet(20)) == RESNET20_BLOCKS
    assert residual_blocks(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))) == []
    lenet = arq.models.get_architecture("lenet", "mnist")
    with pytest.raises(ValueError, match="residual_bits"):
        quant.quantize(lenet, Policy.uniform(lenet, 4, 4), torch.rand(8, 1, 28, 28),
                       config=QuantConfig(residual_bits=8))


def test_every_block_output_lies_on_the_stream_grid():
    model = cifar_resnet(20)
    qmodel = _quantized(model)
    float_stream = _quantized(model, residual_bits=32)
    extra = set(qmodel.state_dict()) - set(float_stream.state_dict())
    assert extra == ({f"{b}.{RESIDUAL_QUANTIZER}.{key}" for b in RESNET20_BLOCKS for key in ("scale", "signed")}
                     | {f"{b}.{SHORTCUT_QUANTIZER}.{key}" for b in RESNET20_SHORTCUTS for key in ("scale", "signed")})
    without_shortcuts = _quantized(model, shortcuts=False)
    assert not any(SHORTCUT_QUANTIZER in key for key in without_shortcuts.state_dict())
    assert set(float_stream.state_dict()) <= set(qmodel.state_dict())  # the blocks keep their keys
    outputs = {}
    hooks = [qmodel.get_submodule(name).register_forward_hook(
        lambda module, args, out, name=name: outputs.__setitem__(name, out)) for name in RESNET20_BLOCKS]
    with torch.no_grad():
        logits = qmodel(_noisy(16))
    for hook in hooks:
        hook.remove()
    for name in RESNET20_BLOCKS:
        quantizer = qmodel.get_submodule(f"{name}.{RESIDUAL_QUANTIZER}")
        assert isinstance(quantizer, ActivationQuantizer) and quantizer.bits == 8
        assert not bool(quantizer.signed) and float(quantizer.scale) > 0  # calibrated, after a ReLU
        codes = outputs[name] / quantizer.scale  # q * s / s: q up to one float rounding
        assert float((codes - codes.round()).abs().max()) <= 1e-4
        assert codes.round().min() >= 0 and codes.round().max() <= 255
    with torch.no_grad():
        float_logits = float_stream(_noisy(16))
    assert not torch.equal(logits, float_logits)  # the stream quantizers act


def test_every_add_adds_two_stream_tensors():
    """``residual_shortcuts``: the first block's input (for every use: its conv1 reads the stream's
    values, as later blocks' conv1 do) and the downsampling shortcuts' outputs are quantized too."""
    qmodel = _quantized(cifar_resnet(20))
    shortcuts = {name: qmodel.get_submodule(f"{name}.{SHORTCUT_QUANTIZER}") for name in RESNET20_SHORTCUTS}
    # after the stem's ReLU; the folded 1x1 conv + BN outputs have both signs
    assert [bool(q.signed) for q in shortcuts.values()] == [False, True, True]
    seen = {}
    hooks = [q.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, (args[0], out)))
             for name, q in shortcuts.items()]
    hooks.append(qmodel.get_submodule("1.layer1.0.conv1").register_forward_pre_hook(
        lambda m, args: seen.__setitem__("conv1", args[0])))
    hooks.append(qmodel.get_submodule("1.layer2.0.downsample").register_forward_hook(
        lambda m, args, out: seen.__setitem__("downsample", out)))
    with torch.no_grad():
        qmodel(_noisy(8))
    for hook in hooks:
        hook.remove()
    assert torch.equal(seen["conv1"], seen["1.layer1.0"][1])
    assert torch.equal(seen["downsample"], seen["1.layer2.0"][0])
    for name, quantizer in shortcuts.items():
        q_lo, q_hi = quantizer.levels
        codes = seen[name][1] / quantizer.scale
        assert float((codes - codes.round()).abs().max()) <= 1e-4
        assert q_lo <= codes.round().min() and codes.round().max() <= q_hi
        assert not torch.equal(seen[name][0], seen[name][1])


def test_saved_model_loads_with_its_stream_quantizers(tmp_path):
    model = cifar_resnet(20)
    qmodel = _quantized(model)
    path = tmp_path / "resnet.safetensors"
    quant.save(qmodel, path)
    loaded = quant.load(path, cifar_resnet(20))
    assert loaded.arq_quant["config"].residual_bits == 8 and loaded.arq_quant["config"].residual_shortcuts
    assert sum(name.endswith(SHORTCUT_QUANTIZER) for name, _ in loaded.named_modules()) == 3
    x = _noisy(8)
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))


def test_files_saved_before_residual_shortcuts_load_without_them(tmp_path):
    """A file whose quant_config has no ``residual_shortcuts`` (saved before the option) was made
    without shortcut quantizers, and loads so."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    model = cifar_resnet(20)
    qmodel = _quantized(model, shortcuts=False)
    path, old_path = tmp_path / "resnet.safetensors", tmp_path / "resnet-old.safetensors"
    quant.save(qmodel, path)
    with safe_open(str(path), framework="pt") as handle:
        metadata, tensors = handle.metadata(), {key: handle.get_tensor(key) for key in handle.keys()}
    stored = json.loads(metadata["quant_config"])
    del stored["residual_shortcuts"]
    save_file(tensors, str(old_path), metadata={**metadata, "quant_config": json.dumps(stored)})
    loaded = quant.load(old_path, cifar_resnet(20))
    assert loaded.arq_quant["config"].residual_shortcuts is False
    assert not any(name.endswith(SHORTCUT_QUANTIZER) for name, _ in loaded.named_modules())
    x = _noisy(8)
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))


def _integer_codes(model, x):
    return codes_by_layer(model, x, (IntegerConv2d, IntegerLinear),
                          lambda m, x: m.input_codes(x).to(torch.int32) - m.zero_point)


def _stream_convs(model):
    return [m for m in model.modules() if isinstance(m, IntegerConv2d) and m.stream_output is not None]


@needs_onednn
@pytest.mark.parametrize("residual_bits,shortcuts", [(8, True), (5, True), (8, False)])
def test_integer_model_keeps_the_stream_as_uint8_and_agrees(residual_bits, shortcuts):
    qmodel = _quantized(cifar_resnet(20), residual_bits=residual_bits, shortcuts=shortcuts)
    integer = to_integer(qmodel)
    unfused = to_integer(qmodel, IntegerExecutionConfig(fuse_epilogues=False))
    readers = [m for m in integer.modules() if isinstance(m, IntegerConv2d) and m.stream_zero_point is not None]
    writers = [m for m in integer.modules() if isinstance(m, IntegerConv2d) and m.writes_stream]
    if residual_bits == 8 and shortcuts:
        # every block adds two code tensors in oneDNN and writes its own; the stem and the 2
        # downsampling convs write the shortcut codes
        assert len(_stream_convs(integer)) == 9 and len(writers) == 3
        assert "adds the residual stream, writes its codes" in repr(integer)
        assert "writes residual-stream codes" in repr(integer)
    elif residual_bits == 8:
        # 6 identity blocks add the earlier stream's codes in oneDNN and write their own; the first
        # block (after the float stem) and the 2 downsampling blocks add in float, then quantize
        assert len(_stream_convs(integer)) == 6 and not writers
    else:  # oneDNN's fused add writes 8-bit unsigned codes only: every stream is quantized after the add
        assert not _stream_convs(integer) and len(writers) == 3
    # conv1 of blocks 2-9 (and of block 1, from its shortcut codes) and both 1x1 shortcuts read uint8 codes
    assert len(readers) == (11 if shortcuts else 10)
    assert not _stream_convs(unfused) and not any(isinstance(m, StreamCodes) for m in unfused.modules())
    x = _noisy(128)
    reference, reference_codes = codes_by_layer(qmodel, x)
    for candidate in (integer, unfused):
        result, codes = _integer_codes(candidate, x)
        assert_within_tolerance(result, reference, codes, reference_codes, 0.75 * len(x))
    with torch.no_grad():
        streams = {}
        hooks = [m.register_forward_hook(lambda m, a, out: streams.__setitem__(m, out))
                 for m in _stream_convs(integer) + [m for m in integer.modules() if isinstance(m, StreamCodes)]]
        integer(x)
        for hook in hooks:
            hook.remove()
    assert streams and all(out.dtype == torch.uint8 for out in streams.values())


@needs_onednn
@pytest.mark.parametrize("bits", [(8, 8), (4, 4)])
def test_layers_on_the_stream_grid_take_its_codes_as_they_are(bits):
    """At W8A8 with an 8-bit stream each reader's input quantizer is calibrated on the stream's own
    tensor, so it has the stream's grid: the codes pass through, with the requantized result exactly."""
    qmodel = _quantized(cifar_resnet(20), residual_bits=8, bits=bits)
    integer = to_integer(qmodel)
    readers = [m for m in integer.modules() if isinstance(m, IntegerConv2d) and m.stream_zero_point is not None]
    assert len(readers) == 11
    passing = [m for m in readers if m.stream_passes_through]
    if bits == (8, 8):
        assert passing == readers and "takes residual-stream codes as they are" in repr(integer)
        codes = torch.randint(0, 256, (2, 16, 5, 5), dtype=torch.uint8)
        assert readers[0].input_codes(codes) is codes
    else:  # 4-bit grids: every reader requantizes
        assert not passing and "takes residual-stream codes, requantized" in repr(integer)
    x = _noisy(64)
    with torch.no_grad():
        result = integer(x)
        for reader in passing:
            reader.stream_passes_through = False
        requantized = integer(x)
    assert torch.equal(result, requantized)


@needs_onednn
def test_blocks_that_compute_the_shortcut_last_still_add_on_the_stream():
    """torchvision's ResNet blocks compute the downsampling shortcut after the branch, so the
    shortcut's codes exist only after conv2 in the graph: the fused add's conv moves next to the add.
    All 8 adds of a ResNet-18 are oneDNN's, eager and compiled, within the tolerance."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    generator = torch.Generator().manual_seed(1)
    calibration = torch.rand(16, 3, 32, 32, generator=generator)
    qmodel = quant.quantize(model, Policy.uniform(model, 4, 4), calibration, config=QuantConfig(residual_bits=8))
    assert sorted(name for name, _ in qmodel.named_modules() if name.endswith(SHORTCUT_QUANTIZER)) == [
        f"layer{stage}.0.{SHORTCUT_QUANTIZER}" for stage in (1, 2, 3, 4)]  # entry after the max-pool; 3 downsamplings
    integer = to_integer(qmodel)
    unfused = to_integer(qmodel, IntegerExecutionConfig(fuse_epilogues=False))
    assert len(_stream_convs(integer)) == 8
    assert sum(m.writes_stream for m in integer.modules() if isinstance(m, IntegerConv2d)) == 3
    x = torch.rand(64, 3, 32, 32, generator=generator) + 0.25 * torch.randn(64, 3, 32, 32, generator=generator)
    reference, reference_codes = codes_by_layer(qmodel, x)
    result, codes = _integer_codes(integer, x)
    assert_within_tolerance(result, reference, codes, reference_codes, 0.5 * len(x))
    with torch.no_grad():
        assert torch.equal(integer(x), result)  # the in-place adds left nothing behind
    # the adds fused into oneDNN's sum post-op round as the unfused adds do up to float ties: the same
    # tolerance (where a tie flips a code, here in 2 of the 64 inputs, the logits differ)
    expected, expected_codes = _integer_codes(unfused, x)
    assert_within_tolerance(result, expected, codes, expected_codes, 0.5 * len(x))


class _LateShortcut(nn.Module):
    """A block computing its downsampling shortcut after the branch; ``mutate`` then writes into
    conv2's input in between, which forbids moving conv2 next to the add."""

    class Block(nn.Module):
        def __init__(self, mutate: bool):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.down, self.mutate = nn.Conv2d(4, 8, 1), mutate

        def forward(self, x):
            hidden = torch.relu(self.conv1(x))
            out = self.conv2(hidden)
            if self.mutate:
                hidden.mul_(2.0)
            return torch.relu(out + self.down(x))

    def __init__(self, mutate: bool):
        super().__init__()
        self.stem, self.block = nn.Conv2d(4, 4, 1), self.Block(mutate)

    def forward(self, x):
        return self.block(torch.relu(self.stem(x)))


@needs_onednn
@pytest.mark.parametrize("mutate", [False, True])
def test_the_add_moves_after_a_late_shortcut_only_when_nothing_in_between_writes(mutate):
    torch.manual_seed(5)
    model = _LateShortcut(mutate).eval()
    x = torch.randn(8, 4, 6, 6)
    qmodel = quant.quantize(model, Policy.uniform(model, 4, 6), x, config=QuantConfig(residual_bits=8))
    fused = to_integer(qmodel)
    assert len(_stream_convs(fused)) == (0 if mutate else 1)
    with torch.no_grad():
        expected = to_integer(qmodel, IntegerExecutionConfig(fuse_epilogues=False))(x)
        result = fused(x)
        reference = qmodel(x)
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    torch.testing.assert_close(result, reference, rtol=0, atol=0.05 * float(reference.abs().max()))


class _TwoBlocks(nn.Module):
    """Two residual blocks; ``read_again`` also reads block 1's output after block 2 (its buffer
    must then survive block 2's fused add)."""

    class Block(nn.Module):
        def __init__(self, relu: bool = True):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
            self.relu = relu

        def forward(self, x):
            out = self.conv2(torch.relu(self.conv1(x))) + x
            return torch.relu(out) if self.relu else out

    def __init__(self, read_again: bool, relu: bool = True):
        super().__init__()
        self.stem, self.block1, self.block2 = nn.Conv2d(4, 4, 1), self.Block(relu), self.Block(relu)
        self.read_again = read_again

    def forward(self, x):
        first = self.block1(torch.relu(self.stem(x)))
        second = self.block2(first)
        return second * first if self.read_again else second


@needs_onednn
@pytest.mark.parametrize("read_again", [False, True])
def test_fused_add_writes_into_the_earlier_stream_only_when_nothing_reads_it_later(read_again):
    torch.manual_seed(3)
    model = _TwoBlocks(read_again).eval()
    x = torch.randn(8, 4, 6, 6).relu()
    qmodel = quant.quantize(model, Policy.uniform(model, 4, 6), x, config=QuantConfig(residual_bits=8))
    assert residual_blocks(model) == ["block1", "block2"]
    fused = to_integer(qmodel)
    unfused = to_integer(qmodel, IntegerExecutionConfig(fuse_epilogues=False))
    # block1 adds its input's codes (its shortcut quantizer's, which the stem writes): read by
    # nothing after; block2 adds block1's output, which read_again reads after
    assert len(_stream_convs(fused)) == (1 if read_again else 2)
    with torch.no_grad():
        expected = unfused(x)
        result = fused(x)
        again = fused(x)
        reference = qmodel(x)
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    assert torch.equal(again, result)
    torch.testing.assert_close(result, reference, rtol=0, atol=0.05 * float(reference.abs().max()))


@needs_onednn
@pytest.mark.parametrize("bits", [8, 5])
def test_signed_streams_without_a_relu_keep_their_zero_point(bits):
    """Blocks ending in a bare add: signed stream codes (zero point 2^(b-1)), quantized after a float
    add, read by the next block's layers through requantize_codes with that zero point."""
    torch.manual_seed(4)
    model = _TwoBlocks(read_again=False, relu=False).eval()
    x = torch.randn(16, 4, 6, 6)
    qmodel = quant.quantize(model, Policy.uniform(model, 4, 6), x, config=QuantConfig(residual_bits=bits))
    assert all(bool(qmodel.get_submodule(f"{b}.{RESIDUAL_QUANTIZER}").signed) for b in ("block1", "block2"))
    integer = to_integer(qmodel)
    streams = [m for m in integer.modules() if isinstance(m, StreamCodes)]
    # block1's input (after the stem's ReLU) is unsigned; the 2 block outputs are signed
    assert [(m.signed, m.zero_point) for m in streams] == [(False, 0)] + [(True, 1 << (bits - 1))] * 2
    assert not _stream_convs(integer)  # the fused add writes unsigned 8-bit codes only
    readers = [m for m in integer.modules() if isinstance(m, IntegerConv2d) and m.stream_zero_point is not None]
    assert [m.stream_zero_point for m in readers] == [0, 1 << (bits - 1)]  # block1.conv1, block2.conv1
    with torch.no_grad():
        reference = qmodel(x)
        result = integer(x)
        unfused = to_integer(qmodel, IntegerExecutionConfig(fuse_epilogues=False))(x)
    torch.testing.assert_close(result, unfused, rtol=0, atol=1e-5 * float(unfused.abs().max()))
    torch.testing.assert_close(result, reference, rtol=0, atol=0.05 * float(reference.abs().max()))


@needs_onednn
@pytest.mark.slow
def test_compiled_stream_model_matches_eager():
    """Compiled, the fused add is oneDNN's in-place op as Inductor lowers it (pt2e's graph): it
    overwrites the earlier stream (nothing reads it later) with no copy of ours and no Python op;
    eager, in place: the same logits, under no_grad and under inference_mode as certify runs it
    (where freezing once failed on oneDNN's opaque weights)."""
    qmodel = _quantized(cifar_resnet(14), seed=5)  # 2 blocks a stage: 6 fused adds
    eager = to_integer(qmodel)
    compiled = to_integer(qmodel, IntegerExecutionConfig(compile=True))
    assert _stream_convs(eager) and all(m.stream_output[3] for m in _stream_convs(eager))  # all dead
    x = _noisy(24, seed=6)
    assert_compiled_matches_eager(eager, compiled, x)
    with torch.inference_mode():
        compiled(x)  # compiles again for inference mode
        with torch.profiler.profile() as profile:
            result = compiled(x)
    with torch.no_grad():
        torch.testing.assert_close(result, eager(x), rtol=0, atol=1e-4 * float(result.abs().max()))
    calls = {event.key: event.count for event in profile.key_averages()}
    assert not [key for key in calls if key.startswith("arq::onednn_conv_add_stream")]
    # 15 convolutions (stem, 12 in blocks, 2 shortcuts; 6 add), and only oneDNN's own copy of each sum
    assert calls["onednn::qconv2d_pointwise"] == 15
    assert calls.get("aten::clone", 0) <= 6 and calls.get("aten::copy_", 0) <= 6


class _TwoBlocksConvReadsAgain(_TwoBlocks):
    """A conv reads block 1's output codes (the stream itself) after block 2 has added them."""

    def __init__(self):
        super().__init__(read_again=False)
        self.head = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        first = self.block1(torch.relu(self.stem(x)))
        return self.block2(first) * self.head(first)


@needs_onednn
@pytest.mark.slow
@pytest.mark.parametrize("in_place_compiles", [True, False])
def test_compiled_add_writes_into_a_copy_of_a_stream_read_later(monkeypatch, in_place_compiles):
    """Compiled, block2's add writes into a copy of block1's output codes, which the head conv
    reads after it (functionalization keeps eager semantics: written in place, that read would see
    the sum); block1's add overwrites its dead input stream. On a torch where the in-place op does
    not compile (``in_place_compiles=False``), both adds go through the copying custom op."""
    monkeypatch.setattr(execution, "_STREAM_ADD_COMPILES_IN_PLACE", in_place_compiles)
    torch.manual_seed(3)
    model = _TwoBlocksConvReadsAgain().eval()
    x = torch.randn(8, 4, 6, 6).relu()
    qmodel = quant.quantize(model, Policy.uniform(model, 4, 6), x, config=QuantConfig(residual_bits=8))
    eager = to_integer(qmodel, IntegerExecutionConfig(fuse_residuals=False))  # the copying op, both adds
    assert [m.stream_output[2:] for m in _stream_convs(eager)] == [(False, True), (False, False)]
    assert eager.head.stream_zero_point is not None  # the head reads the stream's codes
    compiled = to_integer(qmodel, IntegerExecutionConfig(compile=True))
    assert_compiled_matches_eager(eager, compiled, x)
    with torch.no_grad():
        reference = qmodel(x)
        torch.testing.assert_close(compiled(x), reference, rtol=0, atol=0.05 * float(reference.abs().max()))
        with torch.profiler.profile() as profile:
            compiled(x)
    calls = {event.key: event.count for event in profile.key_averages()}
    assert calls.get("arq::onednn_conv_add_stream", 0) == (0 if in_place_compiles else 2)


@pytest.mark.skipif(resolve_backend("auto", "cpu") != "cpp", reason="needs the compiled ops (arq._C)")
def test_packed_kernel_model_runs_the_stream_quantizers():
    qmodel = _quantized(cifar_resnet(20), seed=2)
    kernel_model = quant.to_kernels(qmodel)  # the C++ kernels (the fused Triton path: test_quant_kernels.py)
    # 9 block outputs, 3 shortcuts
    assert sum(isinstance(m, ActivationQuantizer) and m.bits == 8 for m in kernel_model.modules()) == 12
    x = _noisy(128, seed=3)
    reference, reference_codes = codes_by_layer(qmodel, x)
    result, codes = codes_by_layer(kernel_model, x, (PackedConv2d, PackedLinear), lambda m, x: m.codes(x))
    assert_within_tolerance(result, reference, codes, reference_codes, 0.75 * len(x))
