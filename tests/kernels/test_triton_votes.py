"""arq_kernels.votes: last layer + argmax + class counts against torch (linear, argmax, bincount)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (pip install 'arq[triton]')")

from arq_kernels.votes import argmax_count, argmax_count_reference, vote_count, vote_count_reference  # noqa: E402

pytestmark = pytest.mark.triton

MANY_PROGRAMS = {"BLOCK_B": 16, "BLOCK_F": 32, "num_warps": 4, "num_stages": 1}


def _int8(shape, generator, lo=-127, hi=127):
    return torch.randint(lo, hi + 1, shape, generator=generator, dtype=torch.int8)


@pytest.mark.parametrize("config", [None, MANY_PROGRAMS], ids=["big_blocks", "many_programs"])
def test_int8_features_exact(config, device, generator):
    """int32 accumulation + float32 epilogue: the same ops as the reference, so equal predictions."""
    batch, features, classes = 203, 70, 10
    x = _int8((batch, features), generator).to(device)
    w = _int8((classes, features), generator).to(device)
    w_scale = (torch.rand(classes, generator=generator) + 0.5).to(device)
    bias = torch.randn(classes, generator=generator).to(device)
    predictions = torch.full((batch,), -7, dtype=torch.int64, device=device)
    counts = vote_count(x, w, bias, classes, feature_scale=0.031, weight_scale=w_scale,
                        predictions=predictions, config=config)
    expected_pred = torch.full((batch,), -7, dtype=torch.int64)
    expected = vote_count_reference(x.cpu(), w.cpu(), bias.cpu(), classes, feature_scale=0.031,
                                    weight_scale=w_scale.cpu(), predictions=expected_pred)
    assert counts.dtype == torch.int64 and counts.shape == (classes,)
    assert torch.equal(counts.cpu(), expected) and int(counts.sum()) == batch
    assert torch.equal(predictions.cpu(), expected_pred)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_float_features_exact_on_integer_data(dtype, device, generator):
    """Small integers make every float32 sum exact, whatever the kernel's summation order."""
    if dtype == torch.bfloat16 and device.type == "cpu":
        pytest.skip("Triton's interpreter multiplies bfloat16 tl.dot operands as raw uint16 bits")
    batch, features, classes = 101, 45, 7
    x = torch.randint(-8, 9, (batch, features), generator=generator).to(dtype).to(device)
    w = torch.randint(-8, 9, (classes, features), generator=generator).float().to(device)
    bias = torch.randint(-3, 4, (classes,), generator=generator).float().to(device)
    counts = vote_count(x, w, bias, classes, config=MANY_PROGRAMS)
    assert torch.equal(counts.cpu(), vote_count_reference(x.cpu(), w.cpu(), bias.cpu(), classes))


def test_ties_go_to_the_lowest_class(device, generator):
    batch, features, classes = 50, 20, 6
    x = _int8((batch, features), generator).to(device)
    zero_w = torch.zeros(classes, features, dtype=torch.int8, device=device)
    ones = torch.ones(classes, device=device)
    counts = vote_count(x, zero_w, None, classes, feature_scale=1.0, weight_scale=ones)  # all logits 0
    assert counts.cpu().tolist() == [batch, 0, 0, 0, 0, 0]
    logits = torch.randint(0, 3, (203, 5), generator=generator).float()  # many ties
    predictions = torch.full((203,), -7, dtype=torch.int64, device=device)
    got = argmax_count(logits.to(device), 5, predictions=predictions, config=MANY_PROGRAMS)
    assert torch.equal(got.cpu(), argmax_count_reference(logits, 5))
    assert torch.equal(predictions.cpu(), torch.argmax(logits, dim=1))


@pytest.mark.parametrize("dtype, classes", [(torch.float64, 1000), (torch.float16, 10), (torch.float32, 1)])
def test_argmax_count(dtype, classes, device, generator):
    logits = torch.randn(77, classes, generator=generator, dtype=torch.float64).to(dtype)
    got = argmax_count(logits.to(device), classes)
    assert torch.equal(got.cpu(), argmax_count_reference(logits, classes))


def test_counts_accumulate_without_sync(device, generator):
    logits = torch.randn(64, 10, generator=generator)
    counts = torch.zeros(10, dtype=torch.int64, device=device)
    argmax_count(logits[:40].to(device), 10, counts=counts)
    argmax_count(logits[40:].to(device), 10, counts=counts)
    assert torch.equal(counts.cpu(), torch.bincount(logits.argmax(1), minlength=10))


def test_rejects_bad_arguments(device):
    x = torch.zeros(4, 8, dtype=torch.int8, device=device)
    w = torch.zeros(3, 8, dtype=torch.int8, device=device)
    with pytest.raises(ValueError):
        vote_count(x, w, None, 3)  # int8 needs scales
    with pytest.raises(ValueError):
        vote_count(x, w, None, 4, feature_scale=1.0, weight_scale=torch.ones(4, device=device))
    with pytest.raises(ValueError):
        argmax_count(torch.zeros(4, 3, device=device), 5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("classes", [10, 1000])
def test_gpu_certification_batch(classes):
    generator = torch.Generator().manual_seed(3)
    batch, features = 16384, 512
    x = _int8((batch, features), generator).cuda()
    w = _int8((classes, features), generator).cuda()
    w_scale = (torch.rand(classes, generator=generator) + 0.5).cuda()
    bias = torch.randn(classes, generator=generator).cuda()
    got = vote_count(x, w, bias, classes, feature_scale=0.01, weight_scale=w_scale)
    expected = vote_count_reference(x.cpu(), w.cpu(), bias.cpu(), classes, feature_scale=0.01, weight_scale=w_scale.cpu())
    assert torch.equal(got.cpu(), expected)
    logits = torch.randn(batch, classes, generator=generator).cuda()
    assert torch.equal(argmax_count(logits, classes).cpu(), argmax_count_reference(logits.cpu(), classes))
