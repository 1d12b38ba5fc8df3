"""arq.compare's paired ACR differences: the statistic the README's "beats" claims rest on."""
import json

import pytest
import torch

from arq.analyze import ResultRow
from arq.compare import paired_acr_difference


def rows(radii, correct=None):
    correct = correct or [1] * len(radii)
    return [ResultRow(i, 0, 0 if c else 1, r, c, 0.1) for i, (r, c) in enumerate(zip(radii, correct))]


def test_difference_is_the_acr_difference_and_counts_wins_and_losses():
    generator = torch.Generator().manual_seed(0)
    a = (torch.rand(300, generator=generator) * 0.9).tolist()
    b = [max(0.0, r - 0.05) if i % 3 else r + 0.02 for i, r in enumerate(a)]
    wrong = [1 if i % 50 else 0 for i in range(300)]  # a wrong image counts 0 whatever its radius
    difference, low, high, wins, losses = paired_acr_difference(rows(a, wrong), rows(b))
    expected = sum((r if c else 0.0) - s for r, s, c in zip(a, b, wrong)) / 300
    assert difference == pytest.approx(expected, abs=1e-12)
    assert low <= difference <= high and high - low < 0.02
    assert wins == sum(1 for r, s, c in zip(a, b, wrong) if (r if c else 0.0) > s)
    assert losses == sum(1 for r, s, c in zip(a, b, wrong) if (r if c else 0.0) < s)


def test_interval_covers_zero_for_exchangeable_noise_and_not_for_a_real_gap():
    generator = torch.Generator().manual_seed(1)
    base = torch.rand(400, generator=generator).tolist()
    noisy = [r + 0.01 * float(torch.randn(1, generator=generator)) for r in base]
    _, low, high, _, _ = paired_acr_difference(rows(noisy), rows(base))
    assert low < 0 < high
    _, low, high, _, _ = paired_acr_difference(rows([r + 0.01 for r in base]), rows(base))
    assert low > 0.009 and high < 0.011


def test_mismatched_images_are_refused():
    with pytest.raises(ValueError, match="same test indices"):
        paired_acr_difference(rows([0.1, 0.2]), rows([0.1]))


def test_certify_rows_shows_the_engine_the_remaining_run(tiny, tiny_model, tmp_path, monkeypatch):
    """compare certifies one image at a time; the engine is prepared once with the samples of
    every image still to do, so a quantized model compiles once when that repays it."""
    from arq import compare
    from arq.smoothing import engine

    calls = []
    real = engine.prepare_model
    monkeypatch.setattr(engine, "prepare_model", lambda model, backend, device, **kw: calls.append(kw) or
                        real(model, backend, device, **kw))
    images, labels = tiny.tiny_data(6, 3)
    test_set = list(zip(images, labels.tolist()))
    config = compare.CompareConfig(n=40, n0=10, batch_size=50)
    path = str(tmp_path / "certify_tiny.tsv")
    first = compare.certify_rows(tiny_model, test_set, [0, 2, 4], path, config)
    assert calls[0] == {"work": 3 * (40 + 10)}
    again = compare.certify_rows(tiny_model, test_set, [0, 2, 4, 5], path, config)  # resumes after 3 rows
    assert calls[-1] == {"work": 1 * (40 + 10)}
    assert [row.idx for row in again] == [0, 2, 4, 5]
    assert [(r.predict, r.radius, r.correct) for r in again[:3]] == [(r.predict, r.radius, r.correct) for r in first]


def test_certify_rows_refuses_to_resume_under_other_settings(tiny, tiny_model, tmp_path):
    """A per-model TSV of arq compare keeps what its rows depend on (path.run.json); resuming it with other
    CERTIFY settings, or another policy for a quantized row, is refused before a row is written."""
    import json

    from arq import compare
    from arq.run_record import RunRecordMismatch

    images, labels = tiny.tiny_data(6, 3)
    test_set = list(zip(images, labels.tolist()))
    config = compare.CompareConfig(n=40, n0=10, batch_size=50)
    path = str(tmp_path / "certify_W4A4.tsv")
    made = {"finetune_steps": 0, "policy": {"layers": {"fc": [4, 4]}}}
    compare.certify_rows(tiny_model, test_set, [0, 2], path, config, settings=made)
    record = json.loads((tmp_path / "certify_W4A4.tsv.run.json").read_text())
    assert (record["n"], record["n0"], record["execution"], record["policy"]) == (40, 10, "as given", made["policy"])
    before = (tmp_path / "certify_W4A4.tsv").read_text()
    with pytest.raises(RunRecordMismatch, match="n was 40, now 60"):
        compare.certify_rows(tiny_model, test_set, [0, 2, 4], path, compare.CompareConfig(n=60, n0=10), settings=made)
    with pytest.raises(RunRecordMismatch, match="policy was"):
        compare.certify_rows(tiny_model, test_set, [0, 2, 4], path, config,
                             settings={**made, "policy": {"layers": {"fc": [8, 8]}}})
    assert (tmp_path / "certify_W4A4.tsv").read_text() == before
    rows = compare.certify_rows(tiny_model, test_set, [0, 2, 4], path, config, settings=made)
    assert [row.idx for row in rows] == [0, 2, 4]


@pytest.mark.parametrize("kwargs, message", [
    ({"level": 1.5}, "level"), ({"level": 0.0}, "level"), ({"level": -0.5}, "level"),
    ({"resamples": 0}, "resamples"), ({"resamples": 2.5}, "resamples"),
])
def test_bootstrap_parameters_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        paired_acr_difference(rows([0.1, 0.2]), rows([0.1, 0.3]), **kwargs)


def test_test_subset_needs_a_positive_count():
    from arq.compare import test_subset

    assert test_subset(10, 3) == [0, 3, 6]
    for images in (0, -1, 2.0):
        with pytest.raises(ValueError, match="images must be a positive integer"):
            test_subset(10, images)


def test_certify_rows_refuses_to_resume_with_other_weights(tiny, tiny_model, tmp_path):
    """The record holds the weights' sha256: model A's rows cut short and resumed with model B
    mixed the two in one file."""
    import copy

    import torch

    from arq import compare
    from arq.run_record import RunRecordMismatch, weights_sha256

    images, labels = tiny.tiny_data(6, 3)
    test_set = list(zip(images, labels.tolist()))
    config = compare.CompareConfig(n=40, n0=10, batch_size=50)
    path = str(tmp_path / "certify_float.tsv")
    compare.certify_rows(tiny_model, test_set, [0, 2], path, config)
    assert json.loads((tmp_path / "certify_float.tsv.run.json").read_text())["model"] == weights_sha256(tiny_model)
    other = copy.deepcopy(tiny_model)
    with torch.no_grad():
        next(other.parameters()).add_(0.5)
    with pytest.raises(RunRecordMismatch, match="model was"):
        compare.certify_rows(other, test_set, [0, 2, 4], path, config)


def test_run_records_compare_values_as_the_file_holds_them(tmp_path):
    """Tuples, integer keys and NaN are what the JSON file turns them into: the same settings resume."""
    from arq.run_record import check_run_record

    path = str(tmp_path / "rows.tsv")
    record = {"uniform": ((8, 8), (4, 4)), "bits": {1: 8}, "x": float("nan")}
    check_run_record(path, record, has_rows=False)
    check_run_record(path, record, has_rows=True)  # no RunRecordMismatch


@pytest.mark.parametrize("label", ["float", "W8A8", "ARQ/1", "../x", ""])
def test_compare_refuses_labels_that_clash_or_are_not_file_names(tiny, tiny_model, tmp_path, label):
    from arq import compare
    from arq.quant import Policy

    images, labels = tiny.tiny_data(6, 3)
    data = list(zip(images, labels.tolist()))
    config = compare.CompareConfig(images=2, n=40, n0=10, batch_size=50, train_images=4, calibration_images=4,
                                   finetune_steps=0)
    with pytest.raises(ValueError, match=f"label {label!r} must differ"):
        compare.compare(tiny_model, data, data, str(tmp_path / "cmp"), config,
                        policies={label: Policy.uniform(tiny_model, 4, 4)})
    assert not (tmp_path / "cmp" / "certify_float.tsv").exists()


def test_compare_csv_quotes_a_label_with_a_comma():
    import csv

    from arq.analyze import ResultRow
    from arq.compare import ModelRow, format_compare_table

    model = ModelRow("ARQ, 0.1 budget", [ResultRow(0, 0, 0, 0.5, 1, 0.1)], 1.0, 0.0156, None)
    rows = list(csv.reader(format_compare_table([model], [0.0], fmt="csv").splitlines()))
    assert rows[1][0] == "ARQ, 0.1 budget" and len(rows[1]) == len(rows[0])
