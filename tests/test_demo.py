import json

import pytest

from arq import analyze
from arq.demo import DemoConfig, format_summary, run_demo


@pytest.mark.slow
def test_demo_runs_end_to_end_and_its_table_matches_its_files(tmp_path):
    config = DemoConfig(images=4, n=300, n0=20, calibration_images=64, finetune_steps=3, out=tmp_path / "demo",
                        radii=(0.0, 0.25, 0.5))
    lines = []
    summaries = run_demo(config, log=lines.append)
    labels = [row["model"] for row in summaries]
    assert labels[:3] == ["FP32", "W8A8", "W4A4"]
    for row in summaries:
        rows = analyze.read_results(tmp_path / "demo" / f"{row['model']}.tsv")
        assert [r.idx for r in rows] == [0, 2500, 5000, 7500]
        assert row["ACR"] == pytest.approx(analyze.average_certified_radius(rows))
        assert row["r=0"] == pytest.approx(analyze.certified_accuracy(rows, [0.0])[0])
        assert 0.0 <= row["clean_accuracy"] <= 1.0
    shares = {row["model"]: row["bitops_share"] for row in summaries}
    assert shares["FP32"] == 1.0
    assert shares["W8A8"] == pytest.approx(64 / 1024)
    assert shares["W4A4"] == pytest.approx(16 / 1024)
    assert (tmp_path / "demo" / "certified_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert [r["model"] for r in saved["rows"]] == labels
    table = (tmp_path / "demo" / "table.md").read_text()
    assert table.strip() == format_summary(summaries, config.radii)
    assert any("| FP32 |" in line for line in lines)


def test_demo_config_rejects_bad_values():
    with pytest.raises(ValueError, match="images"):
        DemoConfig(images=0)
    with pytest.raises(ValueError, match="alpha"):
        DemoConfig(alpha=1.0)


@pytest.mark.parametrize("arguments, message", [
    (["--images", "0"], "images must be >= 1"), (["--alpha", "2"], "alpha must be in (0, 1)"),
    (["--model", "nope"], "no zoo model named 'nope'"), (["--finetune-steps", "-1"], "finetune_steps must be >= 0"),
])
def test_demo_cli_names_bad_options_without_a_traceback(tmp_path, capsys, arguments, message):
    from arq.cli.main import main

    assert main(["demo", "--out", str(tmp_path / "demo"), *arguments]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
