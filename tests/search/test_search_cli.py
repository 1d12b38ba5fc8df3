"""``arq search`` and ``arq compare`` on the tiny model (scaled down to seconds)."""
from __future__ import annotations

import json

import pytest

from arq.quant import Policy


class TinyDataset:
    def __init__(self, tiny, count, seed):
        self.images, self.labels = tiny.tiny_data(count, seed)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], int(self.labels[index])


@pytest.fixture
def installed(monkeypatch, tiny, tiny_model):
    from arq.cli import common

    monkeypatch.setattr(common, "load_model", lambda spec: tiny_model)
    monkeypatch.setattr(common, "load_dataset",
                        lambda name, split, root: TinyDataset(tiny, 60 if split == "train" else 30,
                                                              1 if split == "train" else 2))
    tiny_model.arq_metadata["dataset"] = "mnist"
    return tiny_model


SMALL = ["--budget", "0.03", "--warmup", "1", "--search-images", "6", "--train-images", "30",
         "--calibration-images", "16", "--finetune-steps", "1", "--finetune-batch", "16", "--search-n", "200",
         "--search-n0", "10", "--n-p", "40", "--batch", "200"]


def test_search_cli_writes_log_best_policy_and_resumes(installed, tmp_path, capsys, monkeypatch):
    import torch

    from arq.cli.main import main

    checkpoint_reads = []
    real_load = torch.load

    def counting_load(f, *args, **kwargs):
        if str(f).endswith(".ckpt.pt"):
            checkpoint_reads.append(str(f))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)

    out = tmp_path / "policy.json"
    assert main(["search", "--model", "tiny", "--episodes", "2", "--out", str(out), *SMALL]) == 0
    lines = [json.loads(line) for line in (tmp_path / "policy.jsonl").read_text().splitlines()]
    assert [line["episode"] for line in lines] == [0, 1]
    assert set(lines[0]) >= {"policy", "bitops_share", "reward", "accuracy", "acr", "time"}
    assert all(line["bitops_share"] <= 0.03 for line in lines)
    best = max(lines, key=lambda line: line["reward"])
    assert Policy.load(out).to_haq(installed) == best["policy"]
    assert "episode 1: bitops" in capsys.readouterr().err
    # without --resume an existing search is refused; with it the search continues to 3 episodes
    assert main(["search", "--model", "tiny", "--episodes", "3", "--out", str(out), *SMALL]) == 2
    assert "--resume" in capsys.readouterr().err
    assert checkpoint_reads == []
    assert main(["search", "--model", "tiny", "--episodes", "3", "--out", str(out), "--resume", *SMALL]) == 0
    lines = [json.loads(line) for line in (tmp_path / "policy.jsonl").read_text().splitlines()]
    assert [line["episode"] for line in lines] == [0, 1, 2]
    # the resume read its checkpoint once: checked before the float model's certificates, then used
    assert checkpoint_reads == [str(tmp_path / "policy.ckpt.pt")]
    # resuming with other settings is refused, naming them
    assert main(["search", "--model", "tiny", "--episodes", "4", "--out", str(out), "--resume",
                 *SMALL[:-2], "--batch", "100"]) == 2
    assert "['irs.batch_size']" in capsys.readouterr().err


def test_search_cli_resumes_a_search_from_before_candidate_execution(installed, tmp_path, capsys):
    """A checkpoint written before ``irs.candidate_execution`` existed certified its candidates as
    fake-quant models: resuming it under the default (the integer model) is refused, naming the setting;
    ``--candidate-execution as-given`` continues it."""
    import torch

    from arq.cli.main import main

    out = tmp_path / "policy.json"
    assert main(["search", "--model", "tiny", "--episodes", "1", "--out", str(out), "--candidate-execution",
                 "as-given", *SMALL]) == 0
    checkpoint = tmp_path / "policy.ckpt.pt"
    state = torch.load(checkpoint, weights_only=True)
    fingerprint = json.loads(state["fingerprint"])
    assert fingerprint["irs"].pop("candidate_execution") == "as given"
    assert fingerprint.pop("accuracy_execution") == "as given"
    state["fingerprint"] = json.dumps(fingerprint, sort_keys=True)
    torch.save(state, checkpoint)
    capsys.readouterr()
    assert main(["search", "--model", "tiny", "--episodes", "2", "--out", str(out), "--resume", *SMALL]) == 2
    assert "['accuracy_execution', 'irs.candidate_execution']" in capsys.readouterr().err
    assert main(["search", "--model", "tiny", "--episodes", "2", "--out", str(out), "--resume",
                 "--candidate-execution", "as-given", *SMALL]) == 0
    lines = [json.loads(line) for line in (tmp_path / "policy.jsonl").read_text().splitlines()]
    assert [line["episode"] for line in lines] == [0, 1]


def _checkpoint_from_before_accuracy_execution(main, tmp_path, *options):
    """A search run now under ``options``, its checkpoint rewritten as sessions of 2026-11-28 wrote it:
    ``irs.candidate_execution`` "auto" (IRS on the integer model) and no ``accuracy_execution`` (clean
    accuracy on the fake-quant model, whatever ``candidate_execution`` said)."""
    import torch

    out = tmp_path / "policy.json"
    assert main(["search", "--model", "tiny", "--episodes", "1", "--out", str(out), *SMALL, *options]) == 0
    checkpoint = tmp_path / "policy.ckpt.pt"
    state = torch.load(checkpoint, weights_only=True)
    fingerprint = json.loads(state["fingerprint"])
    assert fingerprint["irs"]["candidate_execution"] == "auto"
    assert fingerprint.pop("accuracy_execution") == "auto"
    state["fingerprint"] = json.dumps(fingerprint, sort_keys=True)
    torch.save(state, checkpoint)
    return out


@pytest.mark.parametrize("options", [["--reward", "haq"], ["--accuracy-weight", "0.5"]])
def test_search_cli_refuses_a_resume_that_would_mix_accuracy_definitions(installed, tmp_path, capsys, options):
    """Where clean accuracy enters the reward, a checkpoint whose episodes measured it on the fake-quant
    model cannot be continued on the integer model: one search would rank policies by two rewards."""
    from arq.cli.main import main

    out = _checkpoint_from_before_accuracy_execution(main, tmp_path, *options)
    capsys.readouterr()
    assert main(["search", "--model", "tiny", "--episodes", "2", "--out", str(out), "--resume", *SMALL,
                 *options]) == 2
    err = capsys.readouterr().err
    assert "['accuracy_execution']" in err and "start a new one" in err
    assert len((tmp_path / "policy.jsonl").read_text().splitlines()) == 1


def test_search_cli_resumes_with_a_warning_where_the_reward_ignores_accuracy(installed, tmp_path, capsys):
    """The "arq" reward without an accuracy weight only logs clean accuracy: the resume goes on and says
    from which episode the logged accuracy is the integer model's."""
    from arq.cli.main import main

    out = _checkpoint_from_before_accuracy_execution(main, tmp_path)
    with pytest.warns(UserWarning, match="episodes before 1 logged the clean accuracy of the candidate run 'as given'"):
        assert main(["search", "--model", "tiny", "--episodes", "2", "--out", str(out), "--resume", *SMALL]) == 0
    lines = [json.loads(line) for line in (tmp_path / "policy.jsonl").read_text().splitlines()]
    assert [line["episode"] for line in lines] == [0, 1]


def test_search_cli_refuses_to_resume_with_another_model_behind_the_same_name(installed, tmp_path, capsys):
    """The checkpoint holds a hash of the model's weights: other weights under the same --model are refused
    before anything is certified, and the first run's log is untouched."""
    import torch

    from arq.cli.main import main

    out = tmp_path / "policy.json"
    assert main(["search", "--model", "tiny", "--episodes", "1", "--out", str(out), *SMALL]) == 0
    log_before = (tmp_path / "policy.jsonl").read_text()
    with torch.no_grad():
        next(installed.parameters()).add_(1e-3)
    capsys.readouterr()
    assert main(["search", "--model", "tiny", "--episodes", "2", "--out", str(out), "--resume", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "['model_weights']" in err and "not those the search started with" in err
    assert "float model on" not in err  # refused before the float model was certified
    assert (tmp_path / "policy.jsonl").read_text() == log_before


def test_search_cli_resume_errors_come_before_the_float_model_is_certified(installed, tmp_path, capsys):
    from arq.cli.main import main

    out = tmp_path / "policy.json"
    # no checkpoint: refused at once, nothing written
    assert main(["search", "--model", "tiny", "--episodes", "1", "--out", str(out), "--resume", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "float model on" not in err
    assert list(tmp_path.iterdir()) == []
    # another n_p: named as the setting, not as a cache error
    assert main(["search", "--model", "tiny", "--episodes", "1", "--out", str(out), *SMALL]) == 0
    capsys.readouterr()
    changed = [*SMALL[:SMALL.index("--n-p")], "--n-p", "80", *SMALL[SMALL.index("--n-p") + 2:]]
    assert main(["search", "--model", "tiny", "--episodes", "2", "--out", str(out), "--resume", *changed]) == 2
    err = capsys.readouterr().err
    assert "['irs.n_p']" in err and "float model on" not in err


def test_search_cli_resume_survives_a_cut_cache_and_refuses_a_missing_log(installed, tmp_path, capsys):
    from arq.cli.main import main

    out = tmp_path / "runs" / "new" / "policy.json"  # folders that do not exist yet
    assert main(["search", "--model", "tiny", "--episodes", "1", "--out", str(out), *SMALL]) == 0
    cache = tmp_path / "runs" / "new" / "policy.irs.pt"
    cache.write_bytes(cache.read_bytes()[:100])  # an interrupted write of an older version
    assert main(["search", "--model", "tiny", "--episodes", "2", "--out", str(out), "--resume", *SMALL]) == 0
    assert "not a readable IRS cache" in capsys.readouterr().err
    log = tmp_path / "runs" / "new" / "policy.jsonl"
    assert [json.loads(line)["episode"] for line in log.read_text().splitlines()] == [0, 1]
    log.unlink()
    assert main(["search", "--model", "tiny", "--episodes", "3", "--out", str(out), "--resume", *SMALL]) == 2
    assert "policy.jsonl is missing" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["inf", "nan", "-1"])
def test_search_cli_accuracy_weight_must_be_finite(installed, tmp_path, capsys, value):
    from arq.cli.main import main

    assert main(["search", "--model", "tiny", "--episodes", "1", "--out", str(tmp_path / "p.json"), *SMALL,
                 "--accuracy-weight", value]) == 2
    assert "--accuracy-weight" in capsys.readouterr().err and not (tmp_path / "p.jsonl").exists()


def test_compare_cli_warns_about_a_given_policy_over_the_budget(installed, tmp_path, capsys):
    from arq.cli.main import main

    policy = tmp_path / "w8a8.json"
    Policy.from_haq(installed, [[8, 8], [8, 8], [8, 8]]).save(policy)
    code = main(["compare", "--model", "tiny", "--out", str(tmp_path / "cmp"), "--images", "2", "--n", "40",
                 "--n0", "10", "--final-finetune-steps", "1", "--uniform", "W4A4", "--haq-policy", str(policy),
                 "--arq-policy", str(policy), "--radii", "0", "--only", "ARQ", *SMALL])
    assert code == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "over --budget 0.03" in line]
    assert len(warnings) == 2 and "--haq-policy" in warnings[0] and "--arq-policy" in warnings[1]
    assert all("costs 0.0625 of FP32's BitOPs" in line for line in warnings)


def test_search_cli_budget_error(installed, tmp_path, capsys):
    from arq.cli.main import main

    code = main(["search", "--model", "tiny", "--episodes", "1", "--out", str(tmp_path / "p.json"), *SMALL[2:],
                 "--budget", "0.001"])
    assert code == 2
    assert "budget 0.001 is below" in capsys.readouterr().err


def test_compare_cli_table_and_plot(installed, tmp_path, capsys):
    from arq.cli.main import main

    policy = tmp_path / "given.json"
    Policy.from_haq(installed, [[4, 4], [4, 4], [4, 4]]).save(policy)
    out = tmp_path / "cmp"
    code = main(["compare", "--model", "tiny", "--out", str(out), "--episodes", "2", "--images", "5",
                 "--n", "100", "--n0", "10", "--final-finetune-steps", "1", "--haq-policy", str(policy),
                 "--radii", "0,0.25", *SMALL])
    assert code == 0
    table = (out / "compare.md").read_text().split("\n\n")[0].splitlines()
    assert table[0].startswith("| model | clean acc | r=0 | r=0.25 | ACR | BitOPs share | search time (s) |")
    labels = [row.split("|")[1].strip() for row in table[2:]]
    assert labels == ["float", "W8A8", "W4A4", "HAQ", "ARQ"]
    csv_rows = [line.split(",") for line in (out / "compare.csv").read_text().splitlines()]
    assert csv_rows[0][-2:] == ["BitOPs share", "search time (s)"]
    shares = {row[0]: float(row[-2]) for row in csv_rows[1:]}
    assert shares["float"] == 1.0 and shares["W8A8"] == 0.0625 and shares["W4A4"] == shares["HAQ"] == 0.015625
    assert shares["ARQ"] <= 0.03
    assert (out / "compare.png").stat().st_size > 1000
    assert len((out / "certify_ARQ.tsv").read_text().splitlines()) == 6
    assert (out / "search_arq.jsonl").exists() and not (out / "search_haq.jsonl").exists()
    out = capsys.readouterr().out
    assert "| ARQ |" in out and "| ARQ | W4A4 |" in out and "| HAQ | float |" in out and "| ARQ | HAQ |" in out
    assert "| HAQ | ARQ |" not in out
    assert "Paired on the same test images" in (tmp_path / "cmp" / "compare.md").read_text()


def test_compare_cli_uniform_baselines(installed, tmp_path):
    from arq.cli.main import main

    policy = tmp_path / "given.json"
    Policy.from_haq(installed, [[3, 3], [3, 3], [3, 3]]).save(policy)
    out = tmp_path / "cmp"
    code = main(["compare", "--model", "tiny", "--out", str(out), "--images", "3", "--n", "50", "--n0", "10",
                 "--final-finetune-steps", "1", "--uniform", "W3A3,w2a4", "--haq-policy", str(policy),
                 "--arq-policy", str(policy), "--radii", "0", *SMALL])
    assert code == 0
    labels = [row.split("|")[1].strip() for row in (out / "compare.md").read_text().split("\n\n")[0].splitlines()[2:]]
    assert labels == ["float", "W3A3", "W2A4", "HAQ", "ARQ"]
    assert Policy.load(out / "policy_W2A4.json").layers == Policy.uniform(installed, 2, 4).layers


@pytest.mark.parametrize("text", ["W9A8", "W4", "W4A4,W4A4", "8x8"])
def test_compare_cli_rejects_bad_uniform(installed, tmp_path, capsys, text):
    from arq.cli.main import main

    assert main(["compare", "--model", "tiny", "--out", str(tmp_path / "cmp"), "--uniform", text]) == 2
    assert "--uniform" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()


def test_compare_cli_only_splits_rows_across_runs(installed, tmp_path, capsys):
    """Rows certified by separate --only runs on one folder equal a single run's rows, and the
    run that finds every row done writes the table."""
    from arq.cli.main import main

    policy = tmp_path / "given.json"
    Policy.from_haq(installed, [[3, 3], [4, 2], [3, 3]]).save(policy)
    common = ["--model", "tiny", "--images", "4", "--n", "60", "--n0", "10", "--final-finetune-steps", "2",
              "--uniform", "W4A4", "--haq-policy", str(policy), "--arq-policy", str(policy), "--radii", "0",
              *SMALL]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(["compare", "--out", str(whole), *common]) == 0
    assert main(["compare", "--out", str(split), "--only", "arq,w4a4", *common]) == 0
    assert sorted(p.name for p in split.glob("certify_*.tsv")) == ["certify_ARQ.tsv", "certify_W4A4.tsv"]
    assert not (split / "compare.md").exists()
    assert "rerun without --only" in capsys.readouterr().err
    assert main(["compare", "--out", str(split), "--only", "float,HAQ", "--resume", *common]) == 0
    assert main(["compare", "--out", str(split), "--resume", *common]) == 0

    def rows(folder, label):  # every column but the time
        return [line.split("\t")[:-1] for line in (folder / f"certify_{label}.tsv").read_text().splitlines()]

    for label in ("float", "W4A4", "HAQ", "ARQ"):
        assert rows(split, label) == rows(whole, label), label
        assert len(rows(split, label)) == 5
    tables = [(folder / "compare.md").read_text().split("\n\n")[0] for folder in (whole, split)]
    assert tables[0] == tables[1]


@pytest.mark.parametrize("text, message", [("W9A9", "--only"), ("float,W8A8", "W8A8")])
def test_compare_cli_rejects_bad_only(installed, tmp_path, capsys, text, message):
    from arq.cli.main import main

    policy = tmp_path / "given.json"
    Policy.from_haq(installed, [[3, 3], [3, 3], [3, 3]]).save(policy)
    code = main(["compare", "--model", "tiny", "--out", str(tmp_path / "cmp"), "--uniform", "W4A4", "--only", text,
                 "--haq-policy", str(policy), "--arq-policy", str(policy), *SMALL])
    assert code == 2
    err = capsys.readouterr().err
    assert "--only" in err and message in err
    assert not (tmp_path / "cmp").exists()
