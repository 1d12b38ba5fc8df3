import pytest
import torch

from arq._ext import compiled_ops_available
from arq.smoothing.votes import count_votes, count_votes_reference


def _int64_reference(logits, num_classes):
    # plain Python over float64 values: first index of the maximum, NaN wins
    counts = [0] * num_classes
    for row in logits.double().tolist():
        best = 0
        for j, v in enumerate(row):
            if v != v:
                best = j
                break
            if v > row[best]:
                best = j
        counts[best] += 1
    return torch.tensor(counts, dtype=torch.int64)


@pytest.mark.parametrize("rows, classes", [(1, 2), (37, 10), (1001, 3), (4099, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_counts_match_a_plain_reference(rows, classes, dtype, backend):
    if backend == "cpp" and not compiled_ops_available():
        pytest.skip("arq._C not built")
    generator = torch.Generator().manual_seed(rows * classes)
    logits = torch.randint(-3, 4, (rows, classes), generator=generator).to(dtype)  # many ties
    logits[rows // 2, classes - 1] = float("nan")
    expected = _int64_reference(logits, classes)
    counts = count_votes(logits, classes, backend=backend)
    assert counts.dtype == torch.int64 and torch.equal(counts, expected)
    assert torch.equal(count_votes_reference(logits, classes), torch.bincount(logits.argmax(1), minlength=classes))


def test_num_classes_must_match_the_logits():
    with pytest.raises(ValueError, match="num_classes=5 disagrees"):
        count_votes(torch.zeros(3, 4), 5)
    with pytest.raises(ValueError, match="logits must have shape"):
        count_votes(torch.zeros(3), 3)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
@pytest.mark.parametrize("backend", ["auto", "cpp", "torch"])
def test_integer_logits_are_counted_as_torch_argmax_counts_them(dtype, backend):
    generator = torch.Generator().manual_seed(7)
    logits = torch.randint(0, 4, (257, 6), generator=generator).to(dtype)  # many ties: lowest index wins
    counts = count_votes(logits, 6, backend=backend)
    assert counts.dtype == torch.int64 and torch.equal(counts, _int64_reference(logits, 6))


def test_complex_and_bool_logits_are_refused_by_name():
    with pytest.raises(TypeError, match="logits must be a real-valued tensor.*complex64"):
        count_votes(torch.zeros(3, 4, dtype=torch.complex64), 4)
    with pytest.raises(TypeError, match="logits must be a real-valued tensor.*bool"):
        count_votes(torch.zeros(3, 4, dtype=torch.bool), 4)
