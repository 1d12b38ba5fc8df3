"""``arq certify``: TSV round trip, interrupt and --resume, refusing to overwrite, sigma handling."""
from __future__ import annotations

import math

import pytest
from scipy.stats import norm

from arq.cli import common
from arq.cli.main import main

HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime"
N0, N, ALPHA, SIGMA = 20, 200, 0.001, 0.25
# Every one of the n samples votes c_A: p_A lower = alpha^(1/n) (Clopper-Pearson with k = n).
FULL_VOTE_RADIUS = SIGMA * norm.ppf(ALPHA ** (1.0 / N))  # 0.4563...
OPTIONS = ["--N0", str(N0), "--N", str(N), "--alpha", str(ALPHA), "--batch", "64", "--device", "cpu"]

# (idx, label, predict, correct) for each data set index of tests/cli/tiny_model.py
EXPECTED = [
    (0, 0, 0, 1), (1, 1, 1, 1), (2, 2, 2, 1), (3, 1, -1, 0), (4, 2, 0, 0),
    (5, 1, 1, 1), (6, 2, 2, 1), (7, 0, 0, 1), (8, 0, 0, 1), (9, 2, 2, 1),
]


def read_rows(path):
    lines = path.read_text().splitlines()
    assert lines[0] == HEADER
    return [line.split("\t") for line in lines[1:]]


def without_time(rows):
    return [row[:-1] for row in rows]


def test_certify_round_trip(tiny, tmp_path, capsys):
    outfile = tmp_path / "out" / "certify.tsv"
    assert main(["certify", "mnist", "tiny", str(SIGMA), str(outfile), *OPTIONS]) == 0
    rows = read_rows(outfile)
    assert [(int(r[0]), int(r[1]), int(r[2]), int(r[4])) for r in rows] == EXPECTED
    radii = {int(r[0]): float(r[3]) for r in rows}
    for index in (0, 1, 2, 4, 5, 6, 8, 9):
        assert radii[index] == pytest.approx(FULL_VOTE_RADIUS, rel=1e-9)
    assert radii[3] == 0.0
    assert 0.0 < radii[7] < FULL_VOTE_RADIUS  # p_A about 0.95: certified, not at the cap
    for row in rows:
        assert row[5] == f"{float(row[5]):.3f}" and float(row[5]) >= 0.0
    # stderr is not a terminal under pytest: no progress bar.
    assert "input/s" not in capsys.readouterr().err


def test_sigma_comes_from_the_model_when_not_given(tiny, tmp_path):
    with_sigma, without_sigma = tmp_path / "with.tsv", tmp_path / "without.tsv"
    assert main(["certify", "mnist", "tiny", str(SIGMA), str(with_sigma), "--max", "8", *OPTIONS]) == 0
    assert main(["certify", "mnist", "tiny", str(without_sigma), "--max", "8", *OPTIONS]) == 0
    assert without_time(read_rows(with_sigma)) == without_time(read_rows(without_sigma))
    assert len(read_rows(with_sigma)) == 8


def test_sigma_positional_and_option_must_agree(tiny, tmp_path, capsys):
    outfile = tmp_path / "out.tsv"
    status = main(["certify", "mnist", "tiny", "0.5", str(outfile), "--sigma", "0.25", *OPTIONS])
    assert status == 2
    assert "SIGMA 0.5 and --sigma 0.25 disagree" in capsys.readouterr().err
    assert not outfile.exists()


def test_sigma_other_than_the_models_warns(tiny, tmp_path, capsys):
    outfile = tmp_path / "out.tsv"
    assert main(["certify", "mnist", "tiny", str(outfile), "--sigma", "0.5", "--max", "1", *OPTIONS]) == 0
    assert "arq: warning: sigma 0.5 differs from the sigma 0.25 the model was trained with" in capsys.readouterr().err
    (row,) = read_rows(outfile)
    # The row is arq.certify at sigma 0.5 on data set index 0 (seed 0).
    from arq import certify

    image, _ = tiny.tiny_dataset()[0]
    expected = certify(tiny.NearestCentreClassifier().eval(), image, sigma=0.5, n=N, n0=N0, alpha=ALPHA, batch_size=64,
                       seed=0, input_index=0)
    assert row[2] == "0" and expected.prediction == 0
    assert float(row[3]) == expected.radius
    assert FULL_VOTE_RADIUS < expected.radius < 2 * FULL_VOTE_RADIUS  # not every sample votes 0 at sigma 0.5


def test_missing_sigma_is_an_error_when_the_model_has_none(tiny, tmp_path, monkeypatch, capsys):
    def model_without_sigma(spec):
        model = tiny.NearestCentreClassifier()
        del model.arq_metadata["sigma"]
        return model

    monkeypatch.setattr(common, "load_model", model_without_sigma)
    assert main(["certify", "mnist", "tiny", str(tmp_path / "out.tsv"), *OPTIONS]) == 2
    assert "the model stores no sigma: give SIGMA (or --sigma)" in capsys.readouterr().err


def test_refuses_to_overwrite_without_resume(tiny, tmp_path, capsys):
    outfile = tmp_path / "out.tsv"
    outfile.write_text("precious\n")
    assert main(["certify", "mnist", "tiny", str(outfile), *OPTIONS]) == 2
    error = capsys.readouterr().err
    assert "exists and is not empty" in error and "--resume" in error
    assert outfile.read_text() == "precious\n"


def test_input_index_is_the_dataset_index(tiny, tmp_path, monkeypatch):
    import arq.smoothing.core as core

    seen = []
    real_certify = core.certify

    def recording_certify(*args, **kwargs):
        seen.append(kwargs["input_index"])
        return real_certify(*args, **kwargs)

    monkeypatch.setattr(core, "certify", recording_certify)
    outfile = tmp_path / "skip3.tsv"
    assert main(["certify", "mnist", "tiny", str(outfile), "--skip", "3", *OPTIONS]) == 0
    assert seen == [0, 3, 6, 9]
    assert [int(row[0]) for row in read_rows(outfile)] == [0, 3, 6, 9]


def test_skip_and_max_select_rows_like_locuslab(tiny, tmp_path):
    full, skipped = tmp_path / "full.tsv", tmp_path / "skipped.tsv"
    assert main(["certify", "mnist", "tiny", str(full), *OPTIONS]) == 0
    assert main(["certify", "mnist", "tiny", str(skipped), "--skip", "2", "--max", "7", *OPTIONS]) == 0
    full_rows = {row[0]: row[:-1] for row in read_rows(full)}
    skipped_rows = without_time(read_rows(skipped))
    assert [row[0] for row in skipped_rows] == ["0", "2", "4", "6"]
    # The noise is indexed by the data set index, so a row is the same whatever --skip says.
    assert skipped_rows == [full_rows[row[0]] for row in skipped_rows]


def test_resume_after_max_extends_without_duplicates(tiny, tmp_path):
    outfile, reference = tmp_path / "out.tsv", tmp_path / "reference.tsv"
    assert main(["certify", "mnist", "tiny", str(reference), *OPTIONS]) == 0
    assert main(["certify", "mnist", "tiny", str(outfile), "--max", "4", *OPTIONS]) == 0
    assert len(read_rows(outfile)) == 4
    assert main(["certify", "mnist", "tiny", str(outfile), "--resume", *OPTIONS]) == 0
    assert without_time(read_rows(outfile)) == without_time(read_rows(reference))
    # Resuming a finished file adds nothing.
    assert main(["certify", "mnist", "tiny", str(outfile), "--resume", *OPTIONS]) == 0
    assert without_time(read_rows(outfile)) == without_time(read_rows(reference))


def test_resume_drops_a_partial_line(tiny, tmp_path, capsys):
    outfile, reference = tmp_path / "out.tsv", tmp_path / "reference.tsv"
    assert main(["certify", "mnist", "tiny", str(reference), *OPTIONS]) == 0
    assert main(["certify", "mnist", "tiny", str(outfile), "--max", "3", *OPTIONS]) == 0
    with open(outfile, "a") as handle:
        handle.write("3\t1\t-1\t0.0")  # a row cut by a crash
    assert main(["certify", "mnist", "tiny", str(outfile), "--resume", *OPTIONS]) == 0
    assert "dropped the incomplete last line" in capsys.readouterr().err
    assert without_time(read_rows(outfile)) == without_time(read_rows(reference))


def test_resume_of_an_empty_or_header_only_file(tiny, tmp_path):
    empty, header_only = tmp_path / "empty.tsv", tmp_path / "header.tsv"
    empty.write_text("")
    header_only.write_text(HEADER + "\n")
    for path in (empty, header_only):
        assert main(["certify", "mnist", "tiny", str(path), "--resume", "--max", "2", *OPTIONS]) == 0
        assert [row[0] for row in read_rows(path)] == ["0", "1"]


def test_resume_with_other_skip_is_refused(tiny, tmp_path, capsys):
    outfile = tmp_path / "out.tsv"
    assert main(["certify", "mnist", "tiny", str(outfile), "--max", "3", *OPTIONS]) == 0
    with open(outfile, "a") as handle:
        handle.write("3\t1")  # a refused resume leaves even a partial line alone
    before = outfile.read_text()
    assert main(["certify", "mnist", "tiny", str(outfile), "--resume", "--skip", "2", *OPTIONS]) == 2
    assert "resume with the options of the first run" in capsys.readouterr().err
    assert outfile.read_text() == before


def test_resume_of_a_foreign_file_is_refused(tiny, tmp_path, capsys):
    outfile = tmp_path / "predict.tsv"
    outfile.write_text("idx\tlabel\tpredict\tcorrect\ttime\n0\t0\t0\t1\t0.1\n")
    assert main(["certify", "mnist", "tiny", str(outfile), "--resume", *OPTIONS]) == 2
    assert "was not written by this command" in capsys.readouterr().err


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--N", "0"], "--N: must be a positive integer"),
        (["--alpha", "1.5"], "--alpha: must be in (0, 1)"),
        (["--max", "-3"], "--max must be -1"),
        (["--device", "warp-drive"], "--device 'warp-drive' is not a torch device"),
        (["--backend", "foo"], "argument --backend: invalid choice: 'foo'"),
        (["--backend", "cuda"], "--backend cuda: backend='cuda' runs on CUDA tensors"),
        (["--seed", str(2**63)], "--seed: must be an integer in [0, 2^63)"),
    ],
)
def test_bad_options_are_named(tiny, tmp_path, capsys, arguments, message):
    outfile = tmp_path / "out.tsv"
    assert main(["certify", "mnist", "tiny", str(outfile), *OPTIONS, *arguments]) == 2
    assert message in capsys.readouterr().err
    assert not outfile.exists() and not (tmp_path / "out.tsv.run.json").exists()


def test_a_model_that_does_not_take_the_datasets_images_fails_before_the_output_is_written(tiny, tmp_path, capsys,
                                                                                          monkeypatch):
    import torch

    monkeypatch.setattr(common, "load_model",
                        lambda spec: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)))
    outfile = tmp_path / "out.tsv"
    assert main(["certify", "mnist", "tiny", "0.25", str(outfile), *OPTIONS]) == 2
    assert "the model does not take mnist's images" in capsys.readouterr().err
    assert not outfile.exists()


def test_a_header_only_file_from_a_failed_run_is_not_a_result_to_keep(tiny, tmp_path):
    outfile = tmp_path / "out.tsv"
    outfile.write_text(HEADER + "\n")
    assert main(["certify", "mnist", "tiny", str(outfile), "--max", "2", *OPTIONS]) == 0
    assert [row[0] for row in read_rows(outfile)] == ["0", "1"]


def test_a_number_as_the_only_outfile_is_a_missing_outfile(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["certify", "mnist", "tiny", "0.25", *OPTIONS]) == 2
    assert "OUTFILE '0.25' is a number" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_uninterrupted_rows(tiny, tmp_path, run_arq_subprocess):
    reference, outfile = tmp_path / "reference.tsv", tmp_path / "interrupted.tsv"
    assert main(["certify", "mnist", "tiny", str(reference), *OPTIONS]) == 0

    killed = run_arq_subprocess(["certify", "mnist", "tiny", outfile, *OPTIONS],
                                kill_when_file_has_rows=(str(outfile), 4))
    assert killed.returncode == -9, killed.stderr  # SIGKILL, in the middle of index 4
    assert [row[0] for row in read_rows(outfile)] == ["0", "1", "2", "3"]
    with open(outfile, "a") as handle:
        handle.write("4\t2\t0\t0.45")  # and a torn row, as if killed inside write()

    resumed = run_arq_subprocess(["certify", "mnist", "tiny", outfile, "--resume", *OPTIONS])
    assert resumed.returncode == 0, resumed.stderr
    assert without_time(read_rows(outfile)) == without_time(read_rows(reference))
    assert outfile.read_text().endswith("\n")


def test_keyboard_interrupt_leaves_complete_rows(tiny, tmp_path, monkeypatch, capsys):
    import arq.smoothing.core as core

    real_certify = core.certify

    def certify_then_interrupt(*args, **kwargs):
        if kwargs["input_index"] == 2:
            raise KeyboardInterrupt
        return real_certify(*args, **kwargs)

    monkeypatch.setattr(core, "certify", certify_then_interrupt)
    outfile = tmp_path / "out.tsv"
    assert main(["certify", "mnist", "tiny", str(outfile), *OPTIONS]) == 130
    assert "continue with --resume" in capsys.readouterr().err
    assert [row[0] for row in read_rows(outfile)] == ["0", "1"]
    assert math.isclose(float(read_rows(outfile)[0][3]), FULL_VOTE_RADIUS, rel_tol=1e-9)


def test_certify_reads_arq_and_locuslab_checkpoints_on_mnist(tmp_path):
    """The real loaders: the same LeNet weights saved both ways give the same rows on real MNIST."""
    torch = pytest.importorskip("torch")
    from arq.models import get_architecture, save_model

    torch.manual_seed(0)
    model = get_architecture("lenet", "mnist")
    arq_checkpoint = save_model(model, tmp_path / "lenet", {"arch": "lenet", "dataset": "mnist", "sigma": SIGMA})
    locuslab_checkpoint = tmp_path / "noise_0.25" / "checkpoint.pth.tar"
    locuslab_checkpoint.parent.mkdir()
    torch.save({"arch": "lenet", "state_dict": model.state_dict(), "epoch": 90}, locuslab_checkpoint)

    small = ["--N0", "10", "--N", "50", "--batch", "50", "--device", "cpu", "--skip", "100", "--max", "300"]
    from_arq, from_locuslab = tmp_path / "arq.tsv", tmp_path / "locuslab.tsv"
    assert main(["certify", "mnist", str(arq_checkpoint), str(from_arq), *small]) == 0
    assert main(["certify", "mnist", str(locuslab_checkpoint), str(from_locuslab), *small]) == 0
    rows = read_rows(from_arq)
    assert [(row[0], row[1]) for row in rows] == [("0", "7"), ("100", "6"), ("200", "3")]  # MNIST test labels
    assert without_time(rows) == without_time(read_rows(from_locuslab))


def test_unknown_model_is_named(tmp_path, capsys):
    assert main(["certify", "mnist", str(tmp_path / "missing.pth"), "0.25", str(tmp_path / "out.tsv")]) == 2
    assert "missing.pth" in capsys.readouterr().err
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    assert main(["certify", "mnist", str(garbage), "0.25", str(tmp_path / "out.tsv")]) == 2
    assert "garbage.pth" in capsys.readouterr().err


def test_model_names_resolve_through_the_zoo(monkeypatch):
    import sys
    import types

    from torch import nn

    fake_zoo = types.ModuleType("arq.zoo")
    zoo_model = nn.Linear(2, 2)
    fake_zoo.names = lambda: ["mnist_lenet_s025", "mnist_lenet_s050"]
    fake_zoo.load = lambda name: zoo_model if name == "mnist_lenet_s025" else None
    monkeypatch.setitem(sys.modules, "arq.zoo", fake_zoo)
    assert common.load_model("mnist_lenet_s025") is zoo_model
    with pytest.raises(common.CommandError, match=r"zoo models: mnist_lenet_s025, mnist_lenet_s050"):
        common.load_model("mnist_lenet_s999")


def test_progress_bar_shows_on_a_terminal(tiny, tmp_path, monkeypatch):
    import io
    import sys

    class TerminalStderr(io.StringIO):
        def isatty(self):
            return True

    terminal = TerminalStderr()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["certify", "mnist", "tiny", str(tmp_path / "out.tsv"), "--max", "3", *OPTIONS]) == 0
    assert "certify: 100%" in terminal.getvalue() and "3/3" in terminal.getvalue()


@pytest.mark.parametrize("changed, named", [
    (["--N", str(N + 1)], "N was"), (["--alpha", "0.01"], "alpha was"), (["--seed", "3"], "seed was"),
    (["--sigma", "0.5"], "sigma was"), (["--split", "train"], "split was"),
])
def test_resume_with_settings_that_change_rows_is_refused(tiny, tmp_path, capsys, changed, named):
    outfile = tmp_path / "out.tsv"
    assert main(["certify", "mnist", "tiny", str(outfile), "--max", "3", *OPTIONS]) == 0
    record = (tmp_path / "out.tsv.run.json").read_text()
    before = outfile.read_text()
    assert main(["certify", "mnist", "tiny", str(outfile), "--resume", *OPTIONS, *changed]) == 2
    error = capsys.readouterr().err
    assert "started with other settings" in error and named in error
    assert outfile.read_text() == before and (tmp_path / "out.tsv.run.json").read_text() == record
    # batch size and backend do not change the rows: resuming with them changed is fine
    assert main(["certify", "mnist", "tiny", str(outfile), "--resume", *OPTIONS, "--batch", "50"]) == 0
    assert len(read_rows(outfile)) == len(EXPECTED)


def test_resume_with_other_weights_is_refused(tiny, tmp_path, monkeypatch, capsys):
    outfile = tmp_path / "out.tsv"
    assert main(["certify", "mnist", "tiny", str(outfile), "--max", "3", *OPTIONS]) == 0

    def moved_centres(spec):
        model = tiny.NearestCentreClassifier()
        model.centres.add_(1e-3)
        return model

    monkeypatch.setattr(common, "load_model", moved_centres)
    assert main(["certify", "mnist", "tiny", str(outfile), "--resume", *OPTIONS]) == 2
    assert "model was" in capsys.readouterr().err


def test_resume_of_a_file_without_run_record_warns_and_records(tiny, tmp_path, capsys):
    outfile, reference = tmp_path / "out.tsv", tmp_path / "reference.tsv"
    assert main(["certify", "mnist", "tiny", str(reference), *OPTIONS]) == 0
    assert main(["certify", "mnist", "tiny", str(outfile), "--max", "3", *OPTIONS]) == 0
    (tmp_path / "out.tsv.run.json").unlink()  # as written by an arq without run records
    capsys.readouterr()
    assert main(["certify", "mnist", "tiny", str(outfile), "--resume", *OPTIONS]) == 0
    assert "has no run record" in capsys.readouterr().err
    assert (tmp_path / "out.tsv.run.json").is_file()
    assert without_time(read_rows(outfile)) == without_time(read_rows(reference))


def test_the_engine_sees_the_whole_runs_work(tiny, tmp_path, monkeypatch):
    """One input's samples stay below the engine's compile threshold; the CLI passes the run's total."""
    from arq.smoothing import engine

    seen = []
    original = engine.prepare_model
    monkeypatch.setattr(engine, "prepare_model", lambda model, backend, device, **kw: (
        seen.append((backend, kw.get("work"))), original(model, backend, device, **kw))[1])
    assert main(["certify", "mnist", "tiny", str(tmp_path / "out.tsv"), "--max", "4", *OPTIONS]) == 0
    assert seen[0] == ("auto", 4 * (N + N0))


def test_certify_reads_a_quantized_model_written_by_arq_quant_save(tmp_path):
    """``arq quantize --out`` / arq.quant.save files certify from the shell like any checkpoint,
    and give the rows arq.certify gives the loaded quantized model."""
    torch = pytest.importorskip("torch")
    import arq
    import arq.quant as quant
    from arq.models import get_architecture

    torch.manual_seed(0)
    model = get_architecture("lenet", "mnist")
    model.arq_metadata = {"arch": "lenet", "dataset": "mnist", "sigma": SIGMA, "num_classes": 10}
    qmodel = quant.quantize(model, quant.Policy.uniform(model, 4, 4), torch.rand(32, 1, 28, 28))
    path = tmp_path / "lenet-w4a4.safetensors"
    quant.save(qmodel, path)
    outfile = tmp_path / "q.tsv"
    small = ["--N0", "10", "--N", "50", "--batch", "50", "--device", "cpu", "--skip", "100", "--max", "300"]
    assert main(["certify", "mnist", str(path), str(outfile), *small]) == 0
    rows = read_rows(outfile)
    assert [(row[0], row[1]) for row in rows] == [("0", "7"), ("100", "6"), ("200", "3")]
    from arq.data import get_dataset

    loaded, test_set = quant.load(path), get_dataset("mnist", "test")
    for row in rows:
        certificate = arq.certify(loaded, test_set[int(row[0])][0], n=50, n0=10, batch_size=50,
                                  input_index=int(row[0]))
        assert (int(row[2]), float(row[3])) == (certificate.prediction, certificate.radius)


def _saved_w8a8_lenet(tmp_path):
    """A W8A8 LeNet (MNIST) saved for the CLI, where the integer CPU model can run it (else skip)."""
    torch = pytest.importorskip("torch")
    import arq.quant as quant
    from arq._ext import compiled_ops_available
    from arq.models import get_architecture

    if not compiled_ops_available() or "onednn" not in torch.backends.quantized.supported_engines:
        pytest.skip("needs arq._C and oneDNN (the integer model)")
    torch.manual_seed(0)
    model = get_architecture("lenet", "mnist")
    model.arq_metadata = {"arch": "lenet", "dataset": "mnist", "sigma": SIGMA, "num_classes": 10}
    path = tmp_path / "lenet-w8a8.safetensors"
    quant.save(quant.quantize(model, quant.Policy.uniform(model, 8, 8), torch.rand(32, 1, 28, 28)), path)
    return path


def test_resume_under_another_execution_of_a_quantized_model_is_refused(tmp_path, capsys):
    """The integer CPU model and the fake-quant model (``--backend torch``) may vote differently on a few
    samples: the run record keeps which one made the rows, and resuming under the other is refused. A
    record from before it was kept is resumed with a warning and completed."""
    import json

    path = _saved_w8a8_lenet(tmp_path)
    outfile, record_path = tmp_path / "q.tsv", tmp_path / "q.tsv.run.json"
    small = ["--N0", "10", "--N", "50", "--batch", "50", "--device", "cpu", "--skip", "100"]
    assert main(["certify", "mnist", str(path), str(outfile), *small, "--max", "200"]) == 0
    assert json.loads(record_path.read_text())["execution"] == "integer"
    before = outfile.read_text()
    capsys.readouterr()
    assert main(["certify", "mnist", str(path), str(outfile), *small, "--max", "300", "--resume",
                 "--backend", "torch"]) == 2
    assert "execution was 'integer', now 'as given'" in capsys.readouterr().err
    assert outfile.read_text() == before
    record = json.loads(record_path.read_text())
    del record["execution"]  # as an arq that did not keep it wrote the record
    record_path.write_text(json.dumps(record))
    assert main(["certify", "mnist", str(path), str(outfile), *small, "--max", "300", "--resume"]) == 0
    assert "does not record execution" in capsys.readouterr().err
    assert json.loads(record_path.read_text())["execution"] == "integer" and len(read_rows(outfile)) == 3


def test_resume_with_other_integer_conv_kernels_is_refused(tmp_path, capsys, monkeypatch):
    """The integer model's convolutions run on oneDNN or on arq::lowbit_conv2d (by CPU, or
    ``ARQ_CONV_KERNEL``), whose codes may differ: the run record keeps which (``conv_kernels``) and
    a resume that would switch is refused. Where the op cannot take the W8A8 layers (AVX2 CPUs) both
    runs use oneDNN and the resume goes through."""
    import json

    from arq import ops

    path = _saved_w8a8_lenet(tmp_path)
    monkeypatch.setenv("ARQ_CONV_KERNEL", "onednn")
    outfile, record_path = tmp_path / "q.tsv", tmp_path / "q.tsv.run.json"
    small = ["certify", "mnist", str(path), str(outfile), "--N0", "10", "--N", "50", "--batch", "50",
             "--device", "cpu", "--skip", "100"]
    assert main([*small, "--max", "200"]) == 0
    assert json.loads(record_path.read_text())["conv_kernels"] == "oneDNN"
    before = outfile.read_text()
    capsys.readouterr()
    monkeypatch.setenv("ARQ_CONV_KERNEL", "arq")
    switches = ops._has_kernel("lowbit_conv2d", "CPU") and ops.lowbit_conv_supported(255, 8)
    assert main([*small, "--max", "300", "--resume"]) == (2 if switches else 0)
    if switches:
        assert "conv_kernels was 'oneDNN', now 'arq::lowbit_conv2d on 2 of 2 convolutions" in capsys.readouterr().err
        assert outfile.read_text() == before
