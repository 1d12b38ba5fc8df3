"""arq_kernels.packed_matmul: packing format, int8 x packed-weight GEMM and its fused epilogue."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (pip install 'arq[triton]')")

from arq_kernels.packed_matmul import (  # noqa: E402
    pack_weights,
    packed_linear,
    packed_linear_reference,
    packed_width,
    unpack_weights,
)

pytestmark = pytest.mark.triton

BITS = list(range(2, 9))
M, K, N = 37, 77, 29  # K % (32 // b) != 0 for every b in 2..8; M, N odd
MANY_PROGRAMS = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 1}


def _weights(n, k, bits, generator, extreme=False):
    limit = (1 << (bits - 1)) - 1
    if extreme:  # only the two ends of the range: every sign-extension bit matters
        return (torch.randint(0, 2, (n, k), generator=generator) * 2 - 1).to(torch.int8) * limit
    return torch.randint(-limit, limit + 1, (n, k), generator=generator, dtype=torch.int8)


def _int8(shape, generator):
    return torch.randint(-128, 128, shape, generator=generator, dtype=torch.int8)


# ------------------------------------------------------------------------------------------------
# the packed format
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
def test_pack_roundtrip_and_shape(bits, generator):
    q = _weights(5, K, bits, generator)
    packed = pack_weights(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (5, -(-K // (32 // bits))) == (5, packed_width(K, bits))
    assert torch.equal(unpack_weights(packed, bits, K), q)


def test_pack_layout_example():
    """design.md: value j of a word in bits [j b, (j + 1) b), two's complement, zero padding."""
    q = torch.tensor([[1, -1, 0, 0, 0, 0, 0, 7]], dtype=torch.int8)
    assert pack_weights(q, 4).tolist() == [[0x700000F1]]
    q = torch.tensor([[-1, 1, -1]], dtype=torch.int8)  # 3 of 16 two-bit fields, the rest zero
    assert pack_weights(q, 2).tolist() == [[0b11_01_11]]
    q = torch.tensor([[-127, 127, 0, 0, 5]], dtype=torch.int8)  # 8 bits: second word 0x05
    assert pack_weights(q, 8).tolist() == [[0x00007F81, 0x00000005]]


@pytest.mark.parametrize("bits", BITS)
def test_pack_agrees_with_arq_quant_packing(bits, generator):
    packing = pytest.importorskip("arq.quant.packing", reason="arq.quant.packing not available")
    q = _weights(6, K, bits, generator)
    assert torch.equal(pack_weights(q, bits), packing.pack_weights(q, bits))
    assert torch.equal(packing.unpack_weights(pack_weights(q, bits), bits, K), q)


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError):
        pack_weights(torch.tensor([[-8, 0]], dtype=torch.int8), 4)  # symmetric: -7..7
    with pytest.raises(ValueError):
        pack_weights(torch.zeros(2, 3, dtype=torch.int8), 9)


# ------------------------------------------------------------------------------------------------
# the kernel
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
def test_int32_accumulator_exact(bits, device, generator):
    """Raw int32 output against an exact int64 matmul of the unpacked weights, poisoned output."""
    x = _int8((M, K), generator)
    q = _weights(N, K, bits, generator, extreme=bits % 2 == 0)
    packed = pack_weights(q, bits)
    scales = torch.rand(N, generator=generator) * 0.01
    out = torch.full((M, N), -(1 << 31), dtype=torch.int32, device=device)
    got = packed_linear(x.to(device), packed.to(device), bits, scales.to(device), out_dtype=torch.int32, out=out)
    expected = x.to(torch.int64) @ q.to(torch.int64).T
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(got.cpu().to(torch.int64), expected)


@pytest.mark.parametrize("word_tiles", [True, False], ids=["word_tiles", "gather"])
@pytest.mark.parametrize("bits", [2, 5, 8])
def test_tiling_with_many_programs(bits, word_tiles, device, generator):
    """Small blocks: 3 x 2 tiles in grouped order, ragged M, N and K edges, a non-contiguous x;
    both unpacking paths (word at a time when 32 // b divides BLOCK_K, per-value gather)."""
    x = _int8((K, M), generator).T  # strides (1, M)
    q = _weights(N, K, bits, generator)
    packed = pack_weights(q, bits)
    got = packed_linear(x.to(device), packed.to(device), bits, torch.ones(N, device=device),
                        out_dtype=torch.int32, config={**MANY_PROGRAMS, "WORD_TILES": word_tiles})
    assert torch.equal(got.cpu().to(torch.int64), x.to(torch.int64) @ q.to(torch.int64).T)


EPILOGUES = {
    "float32_bias": dict(out_dtype=torch.float32, bias=True),
    "float16_relu_residual": dict(out_dtype=torch.float16, bias=True, relu=True, residual="float"),
    "bfloat16_int8_residual": dict(out_dtype=torch.bfloat16, residual="int8"),
    "int8_requant_relu": dict(out_scale=0.05, bias=True, relu=True),
    "uint8_requant_residual_relu": dict(out_scale=0.04, out_dtype=torch.uint8, bias=True, relu=True, residual="uint8"),
    "int8_narrow_levels": dict(out_scale=0.3, out_dtype=torch.int8, qmin=-7, qmax=7, residual="float"),
}


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("name", list(EPILOGUES))
def test_fused_epilogue_matches_reference(name, bits, device, generator):
    spec = dict(EPILOGUES[name])
    x = _int8((M, K), generator)
    q = _weights(N, K, bits, generator)
    packed = pack_weights(q, bits)
    scales = torch.rand(N, generator=generator) * 0.02 + 0.001
    bias = torch.randn(N, generator=generator) if spec.pop("bias", False) else None
    kind = spec.pop("residual", None)
    residual, residual_scale = None, None
    if kind == "float":
        residual = torch.randn(M, N, generator=generator) * 2
    elif kind == "int8":
        residual, residual_scale = _int8((M, N), generator), 0.05
    elif kind == "uint8":
        residual, residual_scale = torch.randint(0, 256, (M, N), generator=generator, dtype=torch.uint8), 0.02
    out_dtype = spec.get("out_dtype", torch.int8 if "out_scale" in spec else torch.float32)
    poison = torch.full((M, N), float("nan")) if out_dtype.is_floating_point else torch.full((M, N), 99)
    out = poison.to(out_dtype).to(device)
    kwargs = dict(x_scale=0.021, residual_scale=residual_scale, **spec)
    on = lambda t: None if t is None else t.to(device)  # noqa: E731
    got = packed_linear(x.to(device), packed.to(device), bits, scales.to(device), on(bias),
                        residual=on(residual), out=out, **kwargs)
    expected = packed_linear_reference(x, packed, bits, scales, bias, residual=residual, **kwargs)
    assert got.dtype == expected.dtype == out_dtype
    assert torch.equal(got.cpu(), expected)
    if out_dtype.is_floating_point:
        assert not torch.isnan(got).any()


@pytest.mark.parametrize("bits", [2, 5])
def test_codes_also_matches_reference(bits, device, generator):
    """The float32 output and its int8 codes (``codes_also``) from one pass, against the reference
    and against quantizing the stored output."""
    x = _int8((M, K), generator)
    packed = pack_weights(_weights(N, K, bits, generator), bits)
    scales = torch.rand(N, generator=generator) * 0.02 + 0.001
    bias = torch.randn(N, generator=generator)
    kwargs = dict(x_scale=0.021, relu=bits == 2, codes_also=(0.05, -31, 31, 0))
    got, codes = packed_linear(x.to(device), packed.to(device), bits, scales.to(device), bias.to(device),
                               out=torch.full((M, N), float("nan"), device=device), **kwargs)
    expected, expected_codes = packed_linear_reference(x, packed, bits, scales, bias, **kwargs)
    assert torch.equal(got.cpu(), expected) and torch.equal(codes.cpu(), expected_codes)
    requantized = torch.clamp(torch.round(got.cpu() / torch.tensor(0.05)), -31, 31).to(torch.int8)
    assert torch.equal(codes.cpu(), requantized)


def test_rejects_bad_arguments(device):
    x = torch.zeros(4, 10, dtype=torch.int8, device=device)
    packed = torch.zeros(3, packed_width(10, 4), dtype=torch.int32, device=device)
    scales = torch.ones(3, device=device)
    with pytest.raises(ValueError):
        packed_linear(x, packed, 3, scales)  # wrong width for 3 bits
    with pytest.raises(ValueError):
        packed_linear(x, packed, 4, scales, out_dtype=torch.int8)  # no out_scale
    with pytest.raises(ValueError):
        packed_linear(x, packed, 4, scales, relu=True, out_dtype=torch.int32)
    with pytest.raises(TypeError):
        packed_linear(x.float(), packed, 4, scales)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gpu_large(bits):
    generator = torch.Generator().manual_seed(bits)
    m, k, n = 4096, 1152, 256
    x = _int8((m, k), generator)
    q = _weights(n, k, bits, generator)
    packed = pack_weights(q, bits)
    scales = torch.rand(n, generator=generator) * 0.01
    bias = torch.randn(n, generator=generator)
    got = packed_linear(x.cuda(), packed.cuda(), bits, scales.cuda(), out_dtype=torch.int32)
    assert torch.equal(got.cpu().to(torch.int64), x.to(torch.int64) @ q.to(torch.int64).T)
    got = packed_linear(x.cuda(), packed.cuda(), bits, scales.cuda(), bias.cuda(), x_scale=0.02, relu=True, out_scale=0.1)
    assert torch.equal(got.cpu(), packed_linear_reference(x, packed, bits, scales, bias, x_scale=0.02, relu=True, out_scale=0.1))


@pytest.mark.parametrize("bits", BITS)
def test_unsigned_8_bit_codes_through_the_zero_point(bits, device, generator):
    """Codes 0..255 as int8 ``c - 128`` with x_zero_point = -128: the accumulator is the exact
    ``sum_k c q`` (the kernel subtracts ``z * sum_k q``), extremes and odd sizes included."""
    q = _weights(N, K, bits, generator, extreme=bits % 2 == 0)
    packed = pack_weights(q, bits)
    codes = torch.randint(0, 256, (M, K), generator=generator)
    codes[0], codes[1] = 255, 0
    expected = codes.to(torch.int64) @ q.to(torch.int64).T
    out = torch.full((M, N), -(1 << 31), dtype=torch.int32, device=device)
    got = packed_linear((codes - 128).to(torch.int8).to(device), packed.to(device), bits,
                        torch.ones(N, device=device), out_dtype=torch.int32, x_zero_point=-128, out=out,
                        config=MANY_PROGRAMS if bits == 5 else None)
    assert torch.equal(got.cpu().to(torch.int64), expected)
    scales = torch.rand(N, generator=generator) + 0.5
    reference = packed_linear_reference((codes - 128).to(torch.int8), packed, bits, scales, x_scale=0.02,
                                        x_zero_point=-128)
    result = packed_linear((codes - 128).to(torch.int8).to(device), packed.to(device), bits, scales.to(device),
                           x_scale=0.02, x_zero_point=-128)
    assert torch.equal(result.cpu(), reference)


def test_gemm_configs_follow_the_layer_width(monkeypatch):
    """N = 16 / 32 (CIFAR ResNet widths) get tiles that wide on a GPU; a device table without a
    narrow bucket falls back to the next wider one, then to "default"."""
    from arq_kernels import _common

    assert _common.width_buckets(10) == ("n16", "n32", "small_n", "default")
    assert _common.width_buckets(32) == ("n32", "small_n", "default")
    assert _common.width_buckets(64) == ("small_n", "default") and _common.width_buckets(65) == ("default",)
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    monkeypatch.setattr(_common, "_device_name", lambda index: "Some GPU")  # the "cuda" table
    gpu = torch.device("cuda", 0)
    for family in ("packed_conv", "packed_matmul"):
        assert _common.pick_config(family, gpu, _common.width_buckets(16))["BLOCK_N"] == 16
        assert _common.pick_config(family, gpu, _common.width_buckets(32))["BLOCK_N"] == 32
        assert _common.pick_config(family, gpu, _common.width_buckets(64))["BLOCK_N"] == 64
        assert _common.pick_config(family, gpu, _common.width_buckets(512))["BLOCK_N"] == 128
        assert _common.pick_config(family, gpu, ("no_such_bucket",)) == _common.pick_config(family, gpu)


def test_tuned_device_configs_and_their_off_switch(monkeypatch):
    """A card with its own entries (configs/*.json, measured there) gets them; ARQ_TRITON_TUNED=0 gives
    every card the generic "cuda" entries; every entry is a launchable config (tile sizes for int8 dots)."""
    import json

    from arq_kernels import _common

    monkeypatch.setattr(_common, "interpreting", lambda: False)
    monkeypatch.setattr(_common, "_device_name", lambda index: "NVIDIA H200")
    gpu = torch.device("cuda", 0)
    tuned = _common.pick_config("packed_conv", gpu, _common.width_buckets(64))
    assert (tuned["BLOCK_M"], tuned["BLOCK_N"]) == (64, 64)  # measured on an H200
    monkeypatch.setenv("ARQ_TRITON_TUNED", "0")
    generic = _common.pick_config("packed_conv", gpu, _common.width_buckets(64))
    assert generic == json.load(open(_common._CONFIG_DIR / "packed_conv.json"))["cuda"]["small_n"] != tuned
    for family in ("packed_conv", "packed_matmul"):
        table = json.load(open(_common._CONFIG_DIR / f"{family}.json"))
        for device, buckets in table.items():
            if device == "_doc":
                continue
            assert "default" in buckets, (family, device)
            for config in buckets.values():
                assert config["BLOCK_K"] >= 16 and config["BLOCK_N"] >= 16 and config["BLOCK_M"] >= 16
                assert all(config[key] & (config[key] - 1) == 0 for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
