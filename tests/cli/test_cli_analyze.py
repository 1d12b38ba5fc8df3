"""``arq analyze`` on certify output (the tiny model) and on locuslab/smoothing files."""
from __future__ import annotations

import pytest
from scipy.stats import norm

from arq import analyze
from arq.cli.main import main

OPTIONS = ["--N0", "20", "--N", "200", "--alpha", "0.001", "--batch", "64", "--device", "cpu"]
FULL_VOTE_RADIUS = 0.25 * norm.ppf(0.001 ** (1.0 / 200))  # 0.456...

LOCUSLAB_FILE = (
    "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
    "0\t3\t3\t0.812\t1\t0:00:16.901234\n"
    "20\t8\t8\t0.104\t1\t0:00:16.873321\n"
    "40\t0\t-1\t0.0\t0\t0:00:16.912001\n"
    "60\t6\t5\t0.33\t0\t0:02:32.717239\n"
)


def test_certify_then_analyze_round_trip(tiny, tmp_path, capsys):
    certified = tmp_path / "tiny_sigma_0.25.tsv"
    assert main(["certify", "mnist", "tiny", str(certified), *OPTIONS]) == 0
    capsys.readouterr()
    plot = tmp_path / "certified.png"
    assert main(["analyze", str(certified), "--radii", "0:0.5:0.25", "--format", "csv", "--plot", str(plot)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "run,r=0,r=0.25,r=0.5,ACR"
    label, *values = lines[1].split(",")
    assert label == "tiny_sigma_0.25.tsv"
    rows = analyze.read_results(certified)
    radius_7 = next(row.radius for row in rows if row.idx == 7)
    # 8 of 10 are correct and certified (index 3 abstains, index 4 is wrong); 7 are at the cap > 0.25;
    # index 7's radius (p_A about 0.95) decides r = 0.25. Nothing reaches 0.5 > 0.456.
    at_quarter = (7 + (radius_7 >= 0.25)) / 10
    assert [float(value) for value in values] == pytest.approx(
        [0.8, at_quarter, 0.0, (7 * FULL_VOTE_RADIUS + radius_7) / 10], rel=1e-9)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 0


def test_analyze_locuslab_files_with_envelope_markdown(tmp_path, capsys):
    locuslab, arq_file = tmp_path / "sigma_0.50", tmp_path / "sigma_0.25"
    locuslab.write_text(LOCUSLAB_FILE)
    arq_file.write_text(
        "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
        "0\t3\t3\t0.3\t1\t16.900\n20\t8\t8\t0.3\t1\t16.900\n40\t0\t0\t0.2\t1\t16.9\n60\t6\t6\t0.1\t1\t16.9\n"
    )
    output = tmp_path / "table.md"
    assert main(["analyze", str(locuslab), str(arq_file), "--radii", "0,0.25,0.5",
                 "--labels", "sigma=0.50", "sigma=0.25", "--output", str(output)]) == 0
    assert capsys.readouterr().out == ""
    # sigma 0.50: correct radii 0.812, 0.104 -> 2/4, 1/4, 1/4; ACR (0.812 + 0.104) / 4 = 0.229
    # sigma 0.25: 0.3, 0.3, 0.2, 0.1 -> 4/4, 2/4, 0; ACR 0.9 / 4 = 0.225
    # envelope: 1, 0.5, 0.25; area: 0.1*1 + 0.1*0.75 + 0.1*0.5 + 0.512*0.25 = 0.353
    assert output.read_text() == (
        "| run | r=0 | r=0.25 | r=0.5 | ACR |\n"
        "|---|---:|---:|---:|---:|\n"
        "| sigma=0.50 | 0.500 | 0.250 | 0.250 | 0.229 |\n"
        "| sigma=0.25 | 1.000 | 0.500 | 0.000 | 0.225 |\n"
        "| best over files | 1.000 | 0.500 | 0.250 | 0.353 |\n"
    )


def test_analyze_latex_to_stdout(tmp_path, capsys):
    path = tmp_path / "run.tsv"
    path.write_text(LOCUSLAB_FILE)
    assert main(["analyze", str(path), "--radii", "0:0.5:0.5", "--format", "latex"]) == 0
    assert capsys.readouterr().out.splitlines()[4] == r"run.tsv & 0.500 & 0.250 & 0.229 \\"


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--radii", "1:0:0.5"], "--radii: radii '1:0:0.5'"),
        (["--labels", "a", "b"], "--labels gives 2 names for 1 files"),
        (["--format", "html"], "invalid choice: 'html'"),
        (["--radii", "0:inf:1"], "at most 10000 radii"),
        (["--radii", "0:1e12:1"], "at most 10000 radii"),
        (["--plot", "out.xyz"], "--plot out.xyz: the file name must end in an image format"),
    ],
)
def test_analyze_bad_options_are_named(tmp_path, capsys, arguments, message):
    path = tmp_path / "run.tsv"
    path.write_text(LOCUSLAB_FILE)
    assert main(["analyze", str(path), *arguments]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""  # refused before any table is printed


def test_analyze_missing_and_predict_files(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "nope.tsv")]) == 2
    assert "nope.tsv: no such file" in capsys.readouterr().err
    predict_file = tmp_path / "predict.tsv"
    predict_file.write_text("idx\tlabel\tpredict\tcorrect\ttime\n0\t1\t1\t1\t0.2\n")
    assert main(["analyze", str(predict_file)]) == 2
    assert "no radius column" in capsys.readouterr().err


def test_analyze_files_over_different_images_print_their_rows_without_the_envelope(tmp_path, capsys):
    """A run in progress beside a complete one: each file's row stands; the best-over-files row, which
    would compare fractions of different image sets, is left out with a warning."""
    complete, partial = tmp_path / "complete.tsv", tmp_path / "partial.tsv"
    header = "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
    complete.write_text(header + "".join(f"{i}\t0\t0\t0.5\t1\t0.1\n" for i in range(10)))
    partial.write_text(header + "0\t0\t0\t2.5\t1\t0.1\n")
    assert main(["analyze", str(complete), str(partial), "--radii", "0,1", "--plot", str(tmp_path / "p.png")]) == 0
    captured = capsys.readouterr()
    assert "cover different test images" in captured.err
    assert "complete" in captured.out and "partial" in captured.out and "best over files" not in captured.out
    assert (tmp_path / "p.png").stat().st_size > 1000
    doubled = tmp_path / "doubled.tsv"
    doubled.write_text(header + "0\t0\t0\t0.5\t1\t0.1\n0\t0\t0\t0.5\t1\t0.1\n")
    assert main(["analyze", str(doubled)]) == 2
    assert "several rows for test image(s) [0]" in capsys.readouterr().err
