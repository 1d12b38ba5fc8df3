import json

import pytest
import torch

from arq.cli import train as train_cli
from arq.models import load_checkpoint
from arq.train import TrainConfig, add_gaussian_noise, train


def _small_config(tmp_path, **overrides):
    settings = dict(dataset="mnist", arch="lenet", sigma=0.25, out=str(tmp_path / "run"), epochs=2,
                    batch_size=32, lr=0.05, lr_schedule="cosine", seed=3, max_train_samples=512,
                    max_test_samples=500, num_threads=1, progress=False)
    settings.update(overrides)
    return TrainConfig(**settings)


def test_short_run_learns_and_writes_its_outputs(tmp_path):
    config = _small_config(tmp_path, epochs=3, batch_size=16, lr=0.1, test_every=1)
    summary = train(config)
    # 10 classes: chance is 0.1; three epochs on 512 images (96 SGD steps) reach about 0.8
    assert summary["clean_accuracy"] > 0.5
    assert summary["noisy_accuracy"] > 0.5
    assert summary["test_samples"] == 500

    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [record.get("epoch") for record in records] == [1, 2, 3, None]
    assert records[2]["train_loss"] < records[1]["train_loss"] < records[0]["train_loss"]
    assert records[0]["lr"] == 0.1 and records[1]["lr"] < 0.1  # cosine decay
    # test accuracy is measured every epoch but the last (whose numbers are the final ones)
    assert 0.0 <= records[0]["test_noisy_accuracy"] <= 1.0 and "test_noisy_accuracy" not in records[2]
    assert records[3]["final"]["clean_accuracy"] == summary["clean_accuracy"]

    model = load_checkpoint(summary["model_path"])
    assert summary["model_path"].endswith("mnist-lenet-sigma0.25.safetensors")
    metadata = model.arq_metadata
    assert metadata["sigma"] == 0.25 and metadata["arch"] == "lenet" and metadata["num_classes"] == 10
    assert metadata["training"]["lr"] == 0.1 and metadata["training"]["max_train_samples"] == 512
    assert metadata["noisy_accuracy"] == summary["noisy_accuracy"]


def test_resume_matches_uninterrupted_run(tmp_path):
    uninterrupted = train(_small_config(tmp_path / "a", epochs=3, max_train_samples=256))

    interrupted_config = _small_config(tmp_path / "b", epochs=3, max_train_samples=256)
    stopped = train(interrupted_config, stop_after_epochs=1)
    assert stopped["model_path"] is None and stopped["epochs"] == 1
    resumed = train(_small_config(tmp_path / "b", epochs=3, max_train_samples=256, resume=True))

    first = load_checkpoint(uninterrupted["model_path"]).state_dict()
    second = load_checkpoint(resumed["model_path"]).state_dict()
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert resumed["clean_accuracy"] == uninterrupted["clean_accuracy"]
    records = [json.loads(line) for line in (tmp_path / "b" / "run" / "log.jsonl").read_text().splitlines()]
    assert [record.get("epoch") for record in records] == [1, 2, 3, None]

    # the checkpoint holds RNG states as tensors and loads with weights_only=True
    checkpoint = torch.load(tmp_path / "b" / "run" / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 3
    assert all(isinstance(state, torch.Tensor) for state in checkpoint["rng"].values())


def test_resume_refuses_different_settings(tmp_path):
    train(_small_config(tmp_path, epochs=2, max_train_samples=64), stop_after_epochs=1)
    with pytest.raises(ValueError, match=r"settings differ: sigma \(checkpoint 0.25, now 0.5\)"):
        train(_small_config(tmp_path, epochs=2, max_train_samples=64, sigma=0.5, resume=True))


def test_seeded_noise_augmentation_statistics():
    generator = torch.Generator().manual_seed(0)
    images = torch.full((200, 1, 28, 28), 0.5)
    noisy = add_gaussian_noise(images, 0.5, generator)
    noise = noisy - images
    assert abs(float(noise.mean())) < 0.01
    assert abs(float(noise.std()) - 0.5) < 0.01
    # noise is not clipped to [0, 1]: certification samples are not clipped either
    assert float(noisy.min()) < 0.0 and float(noisy.max()) > 1.0
    assert torch.equal(add_gaussian_noise(images, 0.0, generator), images)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("sigma", -0.1, "sigma must be a finite number >= 0"),
        ("epochs", 0, "epochs must be an integer >= 1"),
        ("lr_schedule", "linear", "lr_schedule must be one of step, cosine"),
        ("arch", "vgg", "arch must be one of"),
        ("dataset", "svhn", "dataset must be one of"),
        ("max_train_samples", 0, "max_train_samples must be None or an integer >= 1"),
        ("lr", float("inf"), "lr must be a finite number > 0"),
        ("weight_decay", float("nan"), "weight_decay must be a finite number >= 0"),
    ],
)
def test_config_validation_names_the_field(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        _small_config(tmp_path, **{field: value})


def test_config_dict_round_trip(tmp_path):
    config = _small_config(tmp_path)
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert config.name == "mnist-lenet-sigma0.25"


def test_cli_trains_and_reports(tmp_path, capsys):
    out = tmp_path / "cli"
    code = train_cli.main(["--dataset", "mnist", "--arch", "lenet", "--sigma", "0.5", "--epochs", "1",
                           "--batch-size", "64", "--max-train-samples", "128", "--max-test-samples", "100",
                           "--threads", "1", "--out", str(out)])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["test_samples"] == 100
    assert (out / "mnist-lenet-sigma0.50.safetensors").is_file()
    assert load_checkpoint(out / "mnist-lenet-sigma0.50.safetensors").arq_metadata["sigma"] == 0.5


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    code = train_cli.main(["--dataset", "mnist", "--arch", "lenet", "--sigma", "-1", "--out", str(tmp_path)])
    assert code == 2
    assert "sigma must be a finite number >= 0" in capsys.readouterr().err


def test_a_run_is_not_overwritten_without_resume(tmp_path):
    """Without --resume a new run would empty the log and replace the checkpoint of the run in --out."""
    train(_small_config(tmp_path, epochs=2, max_train_samples=64), stop_after_epochs=1)
    log_before = (tmp_path / "run" / "log.jsonl").read_text()
    with pytest.raises(ValueError, match=r"holds a run \(checkpoint.pt, log.jsonl\): pass resume=True"):
        train(_small_config(tmp_path, epochs=2, max_train_samples=64))
    assert (tmp_path / "run" / "log.jsonl").read_text() == log_before


def test_resume_drops_a_cut_last_log_line_and_names_a_corrupt_one(tmp_path):
    train(_small_config(tmp_path, epochs=2, max_train_samples=64), stop_after_epochs=1)
    log = tmp_path / "run" / "log.jsonl"
    with open(log, "a") as handle:
        handle.write('{"epoch": 2, "train_lo')  # the interruption cut this line
    with pytest.warns(UserWarning, match="dropped its last line"):
        train(_small_config(tmp_path, epochs=2, max_train_samples=64, resume=True))
    assert [json.loads(line).get("epoch") for line in log.read_text().splitlines()] == [1, 2, None]
    log.write_text("not json\n" + log.read_text())
    with pytest.raises(ValueError, match=r"log.jsonl:1: not a JSON log record"):
        train(_small_config(tmp_path, epochs=2, max_train_samples=64, resume=True))


def test_resume_on_another_device_type_is_named(tmp_path):
    """A CUDA run's noise generator state does not fit a CPU generator (simulated: no GPU here)."""
    train(_small_config(tmp_path, epochs=2, max_train_samples=64), stop_after_epochs=1)
    path = tmp_path / "run" / "checkpoint.pt"
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["rng"]["noise"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA Philox generator's size
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match="another device type than cpu"):
        train(_small_config(tmp_path, epochs=2, max_train_samples=64, resume=True))
