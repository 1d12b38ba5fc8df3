"""``arq predict``: TSV round trip and --resume."""
from __future__ import annotations

from arq.cli.main import main

HEADER = "idx\tlabel\tpredict\tcorrect\ttime"
OPTIONS = ["--N", "200", "--alpha", "0.001", "--batch", "64", "--device", "cpu"]


def read_rows(path):
    lines = path.read_text().splitlines()
    assert lines[0] == HEADER
    return [line.split("\t") for line in lines[1:]]


def test_predict_round_trip(tiny, tmp_path):
    outfile = tmp_path / "predict.tsv"
    assert main(["predict", "mnist", "tiny", "0.25", str(outfile), "--skip", "2", *OPTIONS]) == 0
    rows = read_rows(outfile)
    # idx 0, 2, 6, 8: all samples vote the centre's class; idx 4 is labelled 2 but looks like 0.
    assert [row[:4] for row in rows] == [
        ["0", "0", "0", "1"], ["2", "2", "2", "1"], ["4", "2", "0", "0"], ["6", "2", "2", "1"], ["8", "0", "0", "1"],
    ]
    assert all(float(row[4]) >= 0.0 for row in rows)


def test_predict_abstains_on_the_boundary_and_resumes(tiny, tmp_path):
    outfile = tmp_path / "predict.tsv"
    assert main(["predict", "mnist", "tiny", str(outfile), "--max", "3", *OPTIONS]) == 0
    with open(outfile, "a") as handle:
        handle.write("3\t1")
    assert main(["predict", "mnist", "tiny", str(outfile), "--max", "5", "--resume", *OPTIONS]) == 0
    rows = read_rows(outfile)
    assert [row[0] for row in rows] == ["0", "1", "2", "3", "4"]
    # Index 3 sits half-way between the centres 0.2 and 0.5: the binomial test cannot separate them.
    assert rows[3][:4] == ["3", "1", "-1", "0"]


def test_predict_resume_with_other_n_is_refused(tiny, tmp_path, capsys):
    outfile = tmp_path / "predict.tsv"
    assert main(["predict", "mnist", "tiny", str(outfile), "--max", "3", *OPTIONS]) == 0
    assert main(["predict", "mnist", "tiny", str(outfile), "--resume", *OPTIONS, "--N", "300"]) == 2
    assert "N was 200, now 300" in capsys.readouterr().err
    assert len(read_rows(outfile)) == 3


def test_an_alpha_predict_could_only_abstain_at_is_refused_before_the_output(tiny, tmp_path, capsys):
    outfile = tmp_path / "predict.tsv"
    assert main(["predict", "mnist", "tiny", "0.25", str(outfile), "--N", "1000", "--alpha", "1e-14",
                 "--device", "cpu"]) == 2
    assert "--alpha 1e-14 is not above N * delta" in capsys.readouterr().err
    assert not outfile.exists()
