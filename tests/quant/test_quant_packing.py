import json

import pytest
import torch

import arq.quant as quant
from arq.quant.packing import (
    conv_weight_to_matrix,
    matrix_to_conv_weight,
    pack_layer_weight,
    pack_weights,
    unpack_layer_weight,
    unpack_weights,
)
from quant_nets import cifar_resnet


def test_documented_example_word():
    q = torch.tensor([[1, -1, 0, 0, 0, 0, 0, 7]])
    assert pack_weights(q, 4).item() == 0x700000F1


def test_field_layout_two_bits():
    # 16 values a word at 2 bits; -1 is 0b11, value j at bits [2j, 2j+2)
    q = torch.zeros(1, 17, dtype=torch.int8)
    q[0, 1] = -1
    q[0, 15] = 1
    q[0, 16] = -1
    packed = pack_weights(q, 2)
    assert packed.shape == (1, 2)
    assert packed[0, 0].item() == (0b11 << 2) | (1 << 30)
    assert packed[0, 1].item() == 0b11  # the last word is zero-padded


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("k", [1, 7, 31, 33, 145])
def test_pack_unpack_round_trip_on_odd_sizes(bits, k):
    qmax = 2 ** (bits - 1) - 1
    generator = torch.Generator().manual_seed(bits * 1000 + k)
    q = torch.randint(-qmax, qmax + 1, (5, k), generator=generator)
    q[0, 0], q[-1, -1] = -qmax, qmax  # the extremes
    packed = pack_weights(q, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (5, -(-k // (32 // bits)))
    assert torch.equal(unpack_weights(packed, bits, k), q.to(torch.int8))


def test_conv_weight_order_is_kh_kw_c():
    weight = torch.arange(2 * 3 * 2 * 2).reshape(2, 3, 2, 2)  # [N, C, KH, KW]
    matrix = conv_weight_to_matrix(weight)
    # column index = (kh * KW + kw) * C + c
    assert matrix[1, (1 * 2 + 0) * 3 + 2].item() == weight[1, 2, 1, 0].item()
    assert torch.equal(matrix_to_conv_weight(matrix, weight.shape), weight)
    q = torch.randint(-3, 4, (4, 3, 3, 3))
    assert torch.equal(unpack_layer_weight(pack_layer_weight(q, 3), 3, q.shape), q.to(torch.int8))


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="bits"):
        pack_weights(torch.zeros(2, 2, dtype=torch.int8), 9)
    with pytest.raises(ValueError, match=r"q must lie in \[-7, 7\]"):
        pack_weights(torch.tensor([[-8]]), 4)
    with pytest.raises(TypeError, match="integer dtype"):
        pack_weights(torch.zeros(2, 2), 4)
    with pytest.raises(ValueError, match="words a row"):
        unpack_weights(torch.zeros(2, 3, dtype=torch.int32), 4, 8)


def _quantized_resnet(policy_fn):
    model = cifar_resnet(20)
    calibration = torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return model, quant.quantize(model, policy_fn(model), calibration)


def test_save_load_is_bit_exact(tmp_path):
    def mixed(model):
        names = [n for n, _ in quant.quantizable_layers(model)]
        return quant.Policy({n: quant.LayerBits(2 + i % 7, 32 if i == 0 else 2 + (i * 3) % 7) for i, n in enumerate(names)})

    model, qmodel = _quantized_resnet(mixed)
    path = tmp_path / "q.safetensors"
    quant.save(qmodel, path)
    sidecar = tmp_path / "q.policy.json"
    assert quant.Policy.load(sidecar) == qmodel.arq_quant["policy"]
    loaded = quant.load(path, model=cifar_resnet(20, seed=5))  # other float weights: all come from the file
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))
    for (name, a), (_, b) in zip(quant.quantizable_layers(qmodel), quant.quantizable_layers(loaded)):
        assert torch.equal(a.weight_scale, b.weight_scale), name
        if a.w_bits != 32:
            assert torch.equal(a.integer_weight(), b.integer_weight()), name
    assert loaded.arq_metadata == model.arq_metadata
    assert loaded.arq_quant["folded_batchnorm"] == qmodel.arq_quant["folded_batchnorm"]


def test_saved_file_is_packed(tmp_path):
    from safetensors import safe_open

    model, qmodel = _quantized_resnet(lambda m: quant.Policy.uniform(m, 3, 4))
    path = tmp_path / "q.safetensors"
    quant.save(qmodel, path)
    with safe_open(str(path), framework="pt") as handle:
        packed = handle.get_tensor("1.layer1.0.conv1.weight_packed")
        metadata = handle.metadata()
        assert not any(key.endswith(".weight") and "conv" in key for key in handle.keys())
    assert packed.dtype == torch.int32 and packed.shape == (16, -(-144 // 10))
    assert json.loads(metadata["policy"])["layers"]["1.fc"] == {"w_bits": 3, "a_bits": 4}
    report = quant.bitops(model, quant.Policy.uniform(model, 3, 4), (3, 32, 32))
    # the file holds the packed layers plus small per-layer extras (clip ratios, activation scales, header)
    assert path.stat().st_size < 2 * report.model_bytes


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not an arq quantized model"):
        quant.load(path, model=cifar_resnet(20))


def test_save_needs_a_quantized_model(tmp_path):
    with pytest.raises(ValueError, match="arq.quant.quantize"):
        quant.save(cifar_resnet(20), tmp_path / "x.safetensors")


def test_loaded_model_trains_from_the_saved_scales(tmp_path):
    # 3-bit weights: "auto" clips them at an MSE-optimal ratio r < 1 of max|w|. The loaded
    # weights are q * scale, whose maximum is already the clip, so keeping r would shrink
    # every scale by r in a train-mode forward (which recomputes the scale from the weights).
    model, qmodel = _quantized_resnet(lambda m: quant.Policy.uniform(m, 3, 4))
    layers = dict(quant.quantizable_layers(qmodel))
    assert float(layers["1.layer1.0.conv1"].weight_clip_ratio.min()) < 1.0
    path = tmp_path / "q.safetensors"
    quant.save(qmodel, path)
    loaded = quant.load(path, model=cifar_resnet(20, seed=5))
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = qmodel(x)
    for _, layer in quant.quantizable_layers(loaded):  # train mode for the layers (no BN is left unfolded)
        layer.train()
    trained = loaded(x)  # with grad: the weight scales are recomputed from the weights
    torch.testing.assert_close(trained.detach(), reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))
    for name, layer in quant.quantizable_layers(loaded):
        # to float32 rounding: at most one ulp, and no integer code moves
        torch.testing.assert_close(layer.weight_scale, layers[name].weight_scale, rtol=2 ** -23, atol=0)
        assert torch.equal(layer.integer_weight(), layers[name].integer_weight()), name
    # save -> load -> save: the packed weights and the scales are the same bits
    loaded.eval()
    again = tmp_path / "again.safetensors"
    quant.save(loaded, again)
    from safetensors.torch import load_file
    first, second = load_file(str(path)), load_file(str(again))
    for key in first:
        if key.endswith((".weight_packed", ".weight_scale")):
            assert torch.equal(first[key], second[key]), key
    assert sum(key.endswith(".weight_packed") for key in first) == 22


def test_loaded_model_certifies_as_the_saved_one_on_both_cpu_paths(tmp_path):
    # mixed 2..8-bit layers and an 8-bit residual stream (its quantizers are in the file too): the
    # loaded fake-quant model and the integer model built from it give the saved model's logits
    # bit for bit, so every certificate is the same
    from arq import certify
    from arq._ext import compiled_ops_available
    from quant_nets import mixed_resnet_policy

    model = cifar_resnet(20)
    calibration = torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    qmodel = quant.quantize(model, mixed_resnet_policy(model), calibration,
                            config=quant.QuantConfig(residual_bits=8))
    quant.save(qmodel, tmp_path / "q.safetensors")
    loaded = quant.load(tmp_path / "q.safetensors", model=cifar_resnet(20, seed=5))
    noisy = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)) + 0.25 * torch.randn(
        8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(noisy), qmodel(noisy))
    backends = ["torch"]
    if compiled_ops_available() and "onednn" in torch.backends.quantized.supported_engines:
        backends.append("cpp")
        with torch.no_grad():
            assert torch.equal(quant.to_integer(loaded)(noisy), quant.to_integer(qmodel)(noisy))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    for backend in backends:
        saved = certify(qmodel, x, n=64, n0=16, batch_size=64, backend=backend)
        again = certify(loaded, x, n=64, n0=16, batch_size=64, backend=backend)
        assert [c._replace(backend=None) for c in again] == [c._replace(backend=None) for c in saved], backend
