"""arq.analyze: certified accuracy, ACR, envelope, tables and plots on hand-computed rows."""
import math

import pytest

from arq import analyze
from arq.analyze import ResultRow

RADII = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25]

# Run A: correct at 0.5, correct at 1.2, abstained, wrong with a radius of 0.9.
RUN_A_TSV = (
    "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
    "0\t1\t1\t0.5\t1\t0.010\n"
    "1\t2\t2\t1.2\t1\t0.020\n"
    "2\t3\t-1\t0.0\t0\t0.030\n"
    "3\t4\t5\t0.9\t0\t0.040\n"
)
RUN_A_ACCURACY = [0.5, 0.5, 0.5, 0.25, 0.25, 0.0]
RUN_A_ACR = (0.5 + 1.2) / 4

# Run B, as locuslab/smoothing writes it: radius with {:.3}, time as str(timedelta).
RUN_B_TSV = (
    "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
    "0\t1\t1\t0.3\t1\t0:00:01.500000\n"
    "1\t2\t2\t0.2\t1\t0:02:32.717239\n"
    "2\t3\t3\t0.1\t1\t1:00:00\n"
    "3\t4\t4\t2.0\t1\t1 day, 0:00:02.5\n"
)
RUN_B_ACCURACY = [1.0, 0.5, 0.25, 0.25, 0.25, 0.25]
RUN_B_ACR = (0.3 + 0.2 + 0.1 + 2.0) / 4


@pytest.fixture
def run_files(tmp_path):
    path_a, path_b = tmp_path / "sigma_0.25.tsv", tmp_path / "sigma_0.50.tsv"
    path_a.write_text(RUN_A_TSV)
    path_b.write_text(RUN_B_TSV)
    return path_a, path_b


def test_read_results_parses_both_time_formats(run_files):
    rows_a = analyze.read_results(run_files[0])
    rows_b = analyze.read_results(run_files[1])
    assert rows_a[2] == ResultRow(idx=2, label=3, predict=-1, radius=0.0, correct=0, time=0.03)
    assert [row.idx for row in rows_b] == [0, 1, 2, 3]
    assert rows_b[1].radius == 0.2
    assert rows_b[0].time == pytest.approx(1.5)
    assert rows_b[1].time == pytest.approx(152.717239)
    assert rows_b[2].time == pytest.approx(3600.0)
    assert rows_b[3].time == pytest.approx(86402.5)


@pytest.mark.parametrize(
    "text, seconds",
    [("16.9", 16.9), ("0:02:32.717239", 152.717239), ("0:00:00", 0.0), ("2 days, 0:00:01", 172801.0)],
)
def test_parse_time_seconds(text, seconds):
    assert analyze.parse_time_seconds(text) == pytest.approx(seconds)


def test_parse_time_seconds_rejects_garbage():
    with pytest.raises(ValueError, match="neither seconds"):
        analyze.parse_time_seconds("soon")


def test_read_results_ignores_a_partial_last_line_and_extra_columns(tmp_path):
    path = tmp_path / "killed.tsv"
    path.write_text("time\tidx\tlabel\tpredict\tradius\tcorrect\textra\n0.5\t7\t1\t1\t0.75\t1\tx\n0.2\t8\t1")
    with pytest.warns(UserWarning, match="ignored its last line"):
        rows = analyze.read_results(path)
    assert rows == [ResultRow(idx=7, label=1, predict=1, radius=0.75, correct=1, time=0.5)]


def test_read_results_keeps_a_whole_last_row_without_a_newline(tmp_path):
    """Every field but the last ends at a tab, so a last line with all of them lost at most the end of
    its time: the row counts (a file written without a final newline loses nothing)."""
    path = tmp_path / "nonl.tsv"
    path.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t0.5\t1\t0.1\n1\t2\t2\t0.9\t1\t0.1")
    rows = analyze.read_results(path)
    assert [row.radius for row in rows] == [0.5, 0.9]
    assert analyze.average_certified_radius(rows) == pytest.approx(0.7)


@pytest.mark.parametrize("text", ["0:inf:1", "0:1e12:1", "nan,1", "0:1:nan"])
def test_parse_radii_refuses_infinite_or_endless_grids(text):
    with pytest.raises(ValueError, match="at most 10000 radii"):
        analyze.parse_radii(text)


def test_read_results_reads_predict_files_without_radius(tmp_path):
    path = tmp_path / "predict.tsv"
    path.write_text("idx\tlabel\tpredict\tcorrect\ttime\n0\t3\t3\t1\t0.5\n")
    (row,) = analyze.read_results(path)
    assert row.radius is None and row.correct == 1
    with pytest.raises(ValueError, match="no radius"):
        analyze.certified_accuracy([row], [0.0])


def test_read_results_errors_name_the_file_and_line(tmp_path):
    missing = tmp_path / "missing_column.tsv"
    missing.write_text("idx\tlabel\tradius\n0\t1\t0.5\n")
    with pytest.raises(ValueError, match=r"missing_column.tsv.*lacks column\(s\) \['predict', 'correct'\]"):
        analyze.read_results(missing)
    bad = tmp_path / "bad_row.tsv"
    bad.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\tbig\t1\t0.1\n")
    with pytest.raises(ValueError, match=r"bad_row.tsv:2:"):
        analyze.read_results(bad)


def test_certified_accuracy_and_acr_hand_computed(run_files):
    rows_a = analyze.read_results(run_files[0])
    rows_b = analyze.read_results(run_files[1])
    assert analyze.certified_accuracy(rows_a, RADII) == RUN_A_ACCURACY
    assert analyze.certified_accuracy(rows_b, RADII) == RUN_B_ACCURACY
    assert analyze.average_certified_radius(rows_a) == pytest.approx(RUN_A_ACR)  # 0.425
    assert analyze.average_certified_radius(rows_b) == pytest.approx(RUN_B_ACR)  # 0.65


def test_envelope_is_the_best_run_at_each_radius(run_files):
    runs = [analyze.read_results(path) for path in run_files]
    assert analyze.envelope(runs, RADII) == [1.0, 0.5, 0.5, 0.25, 0.25, 0.25]
    # Exact area under max(A, B): 0.1*1 + 0.1*0.75 + 0.1*0.5 + 0.2*0.5 + 0.7*0.25 + 0.8*0.25 = 0.7
    assert analyze.envelope_area(runs) == pytest.approx(0.7)
    # For one run the area under its curve is its ACR.
    assert analyze.envelope_area(runs[:1]) == pytest.approx(RUN_A_ACR)
    with pytest.raises(ValueError, match="list_of_results"):
        analyze.envelope([], RADII)


@pytest.mark.parametrize(
    "text, radii",
    [("0:1.5:0.25", [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]), ("0:0.3:0.1", [0.0, 0.1, 0.2, 0.3]),
     ("0.5,1,2", [0.5, 1.0, 2.0]), ("1:1:0.5", [1.0])],
)
def test_parse_radii(text, radii):
    assert analyze.parse_radii(text) == radii


@pytest.mark.parametrize("text", ["0:1", "1:0:0.25", "0:1:0", "-1,2", "a:b:c", ""])
def test_parse_radii_rejects_bad_input(text):
    with pytest.raises(ValueError, match="radii"):
        analyze.parse_radii(text)


def test_format_table_markdown(run_files):
    results = {"A": analyze.read_results(run_files[0]), "B": analyze.read_results(run_files[1])}
    table = analyze.format_table(results, [0.0, 0.5, 1.0], "md", envelope_label="best")
    assert table == (
        "| run | r=0 | r=0.5 | r=1 | ACR |\n"
        "|---|---:|---:|---:|---:|\n"
        "| A | 0.500 | 0.500 | 0.250 | 0.425 |\n"
        "| B | 1.000 | 0.250 | 0.250 | 0.650 |\n"
        "| best | 1.000 | 0.500 | 0.250 | 0.700 |\n"
    )


def test_format_table_latex_escapes_labels(run_files):
    results = {"sigma_0.25": analyze.read_results(run_files[0])}
    table = analyze.format_table(results, [0.0, 0.5], "latex")
    assert table.splitlines() == [
        r"\begin{tabular}{lrrr}",
        r"\hline",
        r" & $r = 0$ & $r = 0.5$ & ACR \\",
        r"\hline",
        r"sigma\_0.25 & 0.500 & 0.500 & 0.425 \\",
        r"\hline",
        r"\end{tabular}",
    ]


def test_format_table_csv_has_full_precision(run_files):
    results = {"A": analyze.read_results(run_files[0]), "B": analyze.read_results(run_files[1])}
    lines = analyze.format_table(results, [0.25, 0.75], "csv").splitlines()
    assert lines[0] == "run,r=0.25,r=0.75,ACR"
    assert lines[1] == "A,0.5,0.25,0.425"
    assert lines[2] == "B,0.5,0.25,0.65"
    label, *values = lines[3].split(",")
    assert label == "best over runs"
    assert [float(value) for value in values] == pytest.approx([0.5, 0.25, 0.7])


def test_format_table_rejects_unknown_format(run_files):
    with pytest.raises(ValueError, match="fmt 'html'"):
        analyze.format_table({"A": analyze.read_results(run_files[0])}, RADII, "html")


def test_plot_writes_a_png(run_files, tmp_path):
    results = {"A": analyze.read_results(run_files[0]), "B": analyze.read_results(run_files[1])}
    path = tmp_path / "plots" / "certified.png"
    path.parent.mkdir()
    analyze.plot_certified_accuracy(results, path, RADII)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1000


def test_importing_analyze_does_not_import_matplotlib():
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, arq.analyze; print('matplotlib' in sys.modules)"
    environment = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env=environment)
    assert output.stdout.strip() == "False"


def test_the_envelope_needs_the_same_images_in_every_run(tmp_path):
    """A run still in progress (4 images) against a complete one (100): the envelope took each
    radius's best fraction, so the 4 lucky images set it."""
    complete = [analyze.ResultRow(i, 0, 0 if i < 55 else 1, 0.5, int(i < 55), 0.1) for i in range(100)]
    partial = [analyze.ResultRow(i, 0, 0, 2.5, 1, 0.1) for i in range(4)]
    with pytest.raises(ValueError, match="run 2 covers other test images than run 1"):
        analyze.envelope([complete, partial], [0.0, 1.0])
    with pytest.warns(UserWarning, match="no 'best over runs' row: run 2 covers other test images"):
        table = analyze.format_table({"full": complete, "partial": partial}, [0.0])
    assert "best over runs" not in table and "| full |" in table and "| partial |" in table


def test_a_run_with_repeated_images_is_refused():
    rows = [analyze.ResultRow(i % 3, 0, 0, 0.5, 1, 0.1) for i in range(5)]
    with pytest.raises(ValueError, match=r"several rows for test image\(s\) \[0, 1\]"):
        analyze.format_table({"dup": rows}, [0.0])


def test_labels_with_table_syntax_stay_in_their_cell():
    rows = [analyze.ResultRow(0, 0, 0, 0.5, 1, 0.1)]
    markdown = analyze.format_table({"a|b": rows}, [0.0], envelope_label=None)
    assert markdown.splitlines()[2] == "| a\\|b | 1.000 | 0.500 |"


@pytest.mark.parametrize("line, message", [
    ("0\t1\t1\tnan\t1\t0.1", "radius must be a finite number >= 0, got nan"),
    ("0\t1\t1\tinf\t1\t0.1", "radius must be a finite number >= 0, got inf"),
    ("0\t1\t1\t-0.5\t1\t0.1", "radius must be a finite number >= 0"),
    ("0\t3\t4\t0.9\t1\t0.1", "correct=1 disagrees with predict=4 and label=3"),
    ("0\t3\t3\t0.9\t0\t0.1", "correct=0 disagrees with predict=3 and label=3"),
    ("0\t3\t3\t0.9\t2\t0.1", "correct must be 0 or 1, got 2"),
])
def test_rows_that_would_miscount_certified_accuracy_are_refused(tmp_path, line, message):
    """A NaN radius made ACR NaN and the bisection over sorted radii meaningless; a row marked correct
    with another class than its label counted as certified at its radius (both were read silently)."""
    path = tmp_path / "corrupt.tsv"
    path.write_text(f"idx\tlabel\tpredict\tradius\tcorrect\ttime\n1\t2\t2\t0.5\t1\t0.1\n{line}\n")
    with pytest.raises(ValueError, match=rf"corrupt.tsv:3: {message}"):
        analyze.read_results(path)
    row = analyze.ResultRow(*[float(v) if i == 3 else int(v) for i, v in enumerate(line.split("\t")[:5])], 0.1)
    with pytest.raises(ValueError, match=message):
        analyze.certified_accuracy([row], [0.0])
    with pytest.raises(ValueError, match=message):
        analyze.average_certified_radius([row])
