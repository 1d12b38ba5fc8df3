"""Gaussian-noise training of base classifiers for randomized smoothing (Cohen et al. 2019, sec. 4).

Each training image ``x`` in [0, 1] pixel space is replaced by ``x + sigma * e``, ``e ~ N(0, I)``,
before the model's normalization layer, so that the base classifier f learns to classify the noisy
inputs that the smoothed classifier g(x) = argmax_c P(f(x + e) = c) feeds it. The optimizer is SGD
with momentum and a step or cosine learning-rate schedule, as in locuslab/smoothing's ``train.py``.

The output folder holds
    ``checkpoint.pt``   model, optimizer, scheduler, epoch and RNG states (resumable; read with
                        ``torch.load(weights_only=True)``),
    ``log.jsonl``       one JSON object per epoch, then one ``{"final": ...}`` line,
    ``<name>.safetensors`` the final model in arq's format (see :mod:`arq.models.checkpoint`), with
                        the training arguments and clean / noisy test accuracy in its metadata.

The run is deterministic for a given seed on a given device and torch build, and an interrupted
run resumed from its checkpoint ends with the same weights as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from arq.data import DATASETS, get_dataset
from arq.models import ARCHITECTURES, get_architecture, save_model

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.jsonl"
LR_SCHEDULES = ("step", "cosine")

# Fields that change the trained weights: a resumed run must agree with its checkpoint on them.
_RESULT_FIELDS = (
    "dataset", "arch", "sigma", "epochs", "batch_size", "lr", "momentum", "weight_decay",
    "lr_schedule", "lr_step_size", "lr_gamma", "seed", "max_train_samples",
)


@dataclass
class TrainConfig:
    """Settings of one noise-training run.

    Args:
        dataset: "mnist", "cifar10" or "imagenet".
        arch: an architecture of :data:`arq.models.ARCHITECTURES` built for ``dataset``.
        sigma: standard deviation of the Gaussian noise added to training inputs, in [0, 1]
            pixel units (0 trains without noise).
        out: output folder (checkpoint, log, final model).
        epochs: number of passes over the training set.
        batch_size: images per SGD step.
        lr: initial learning rate.
        momentum: SGD momentum.
        weight_decay: L2 penalty of SGD.
        lr_schedule: "step" (multiply by ``lr_gamma`` every ``lr_step_size`` epochs) or "cosine"
            (cosine annealing from ``lr`` to 0 over ``epochs``, stepped per batch).
        lr_step_size: epochs between decays of the "step" schedule.
        lr_gamma: decay factor of the "step" schedule.
        seed: seeds model initialization, data order, augmentation and noise.
        checkpoint_every: write ``checkpoint.pt`` every this many epochs (and after the last).
        resume: continue from ``out/checkpoint.pt`` if it exists.
        data_root: folder of CIFAR-10 / ImageNet (else ``$ARQ_DATA``); MNIST ships with arq.
        num_workers: DataLoader worker processes (MNIST is batched in memory and uses none).
        device: "cpu", "cuda", "cuda:1" ..., or "auto" (CUDA when available).
        max_train_samples: train on the first this many training images only (tests, smoke runs).
        max_test_samples: evaluate on the first this many test images only.
        test_every: also measure test accuracy every this many epochs (0: only at the end).
        name: file name of the final model (default ``<dataset>-<arch>-sigma<sigma:.2f>``).
        num_threads: ``torch.set_num_threads`` for the run (None: leave torch's choice).
        progress: show tqdm bars (None: only when stderr is a terminal).
    """

    dataset: str
    arch: str
    sigma: float
    out: str
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_schedule: str = "step"
    lr_step_size: int = 30
    lr_gamma: float = 0.1
    seed: int = 0
    checkpoint_every: int = 1
    resume: bool = False
    data_root: str | None = None
    num_workers: int = 0
    device: str = "auto"
    max_train_samples: int | None = None
    max_test_samples: int | None = None
    test_every: int = 0
    name: str | None = None
    num_threads: int | None = None
    progress: bool | None = None

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(DATASETS)}; got {self.dataset!r}")
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {', '.join(ARCHITECTURES)}; got {self.arch!r}")
        if not (isinstance(self.sigma, (int, float)) and math.isfinite(self.sigma) and self.sigma >= 0):
            raise ValueError(f"sigma must be a finite number >= 0, got {self.sigma!r}")
        self.sigma = float(self.sigma)
        for field_name in ("epochs", "batch_size", "checkpoint_every", "lr_step_size"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{field_name} must be an integer >= 1, got {value!r}")
        for field_name in ("num_workers", "test_every"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{field_name} must be an integer >= 0, got {value!r}")
        for field_name in ("max_train_samples", "max_test_samples", "num_threads"):
            value = getattr(self, field_name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{field_name} must be None or an integer >= 1, got {value!r}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}; got {self.lr_schedule!r}")
        if not 0 < self.lr_gamma <= 1:
            raise ValueError(f"lr_gamma must be in (0, 1], got {self.lr_gamma!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2^63), got {self.seed!r}")
        if not self.out:
            raise ValueError("out must name an output folder")
        self.out = str(self.out)
        if self.name is None:
            self.name = default_model_name(self.dataset, self.arch, self.sigma)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})


def default_model_name(dataset: str, arch: str, sigma: float) -> str:
    """``mnist-lenet-sigma0.25``: the name of a trained model file (and of zoo entries)."""
    return f"{dataset}-{arch}-sigma{sigma:.2f}"


def train(config: TrainConfig, *, stop_after_epochs: int | None = None) -> dict[str, Any]:
    """Noise-train ``config.arch`` on ``config.dataset``; returns the final summary.

    ``stop_after_epochs`` ends the run after that many epochs of this call without the final
    evaluation (a controlled interruption; a later call with ``resume=True`` continues).
    The summary has ``model_path``, ``clean_accuracy``, ``noisy_accuracy``, ``test_samples``,
    ``epochs``, ``train_seconds``; ``model_path`` is None when stopped early.
    """
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    device = _resolve_device(config.device)
    out = Path(config.out)
    if not config.resume:  # a finished or interrupted run there would be overwritten epoch by epoch
        earlier = [name for name in (CHECKPOINT_NAME, LOG_NAME, f"{config.name}.safetensors")
                   if (out / name).is_file() and (out / name).stat().st_size > 0]
        if earlier:
            raise ValueError(f"{out} holds a run ({', '.join(earlier)}): pass resume=True (--resume) to continue "
                             "it, or choose another out folder")
    out.mkdir(parents=True, exist_ok=True)
    show_progress = sys.stderr.isatty() if config.progress is None else config.progress

    torch.manual_seed(config.seed)
    data_generator = torch.Generator().manual_seed(config.seed)
    noise_generator = torch.Generator(device=device).manual_seed(config.seed + 1)

    train_set = get_dataset(config.dataset, "train", config.data_root)
    test_set = get_dataset(config.dataset, "test", config.data_root)
    train_batches = _Batches(train_set, config.batch_size, shuffle=True, generator=data_generator,
                             limit=config.max_train_samples, num_workers=config.num_workers, device=device)
    test_batches = _Batches(test_set, max(config.batch_size, 500), shuffle=False, generator=None,
                            limit=config.max_test_samples, num_workers=config.num_workers, device=device)

    model = get_architecture(config.arch, config.dataset).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    scheduler = _make_scheduler(optimizer, config, steps_per_epoch=len(train_batches))
    metadata = {"arch": config.arch, "dataset": config.dataset, "sigma": config.sigma}

    start_epoch, train_seconds = 0, 0.0
    checkpoint_path = out / CHECKPOINT_NAME
    if config.resume and checkpoint_path.is_file():
        start_epoch, train_seconds = _restore(checkpoint_path, config, model, optimizer, scheduler,
                                              data_generator, noise_generator, device)
    _truncate_log(out / LOG_NAME, start_epoch)

    last_epoch = config.epochs if stop_after_epochs is None else min(config.epochs, start_epoch + stop_after_epochs)
    for epoch in range(start_epoch, last_epoch):
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        loss, accuracy = _train_one_epoch(model, train_batches, optimizer, scheduler, config, noise_generator,
                                          description=f"epoch {epoch + 1}/{config.epochs}", show_progress=show_progress)
        if config.lr_schedule == "step":
            scheduler.step()
        elapsed = time.perf_counter() - started
        train_seconds += elapsed
        record = {"epoch": epoch + 1, "lr": lr, "train_loss": loss, "train_noisy_accuracy": accuracy,
                  "seconds": round(elapsed, 3)}
        if config.test_every and (epoch + 1) % config.test_every == 0 and epoch + 1 < config.epochs:
            record.update(_test_accuracies(model, test_batches, config, device, show_progress))
        if (epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == last_epoch:
            _save_checkpoint(checkpoint_path, config, metadata, model, optimizer, scheduler, epoch + 1,
                             train_seconds, data_generator, noise_generator, device)
        _append_log(out / LOG_NAME, record)
        if not show_progress:
            print(json.dumps(record), file=sys.stderr, flush=True)

    if last_epoch < config.epochs:
        return {"model_path": None, "epochs": last_epoch, "train_seconds": train_seconds}

    accuracies = _test_accuracies(model, test_batches, config, device, show_progress)
    summary = {
        "epochs": config.epochs,
        "train_seconds": round(train_seconds, 1),
        "clean_accuracy": accuracies["test_clean_accuracy"],
        "noisy_accuracy": accuracies["test_noisy_accuracy"],
        "test_samples": accuracies["test_samples"],
    }
    final_metadata = dict(metadata, training=config.to_dict(), **summary,
                          torch_version=torch.__version__, device=str(device))
    model_path = save_model(model, out / f"{config.name}.safetensors", final_metadata)
    summary["model_path"] = str(model_path)
    _append_log(out / LOG_NAME, {"final": summary})
    return summary


# ------------------------------------------------------------------------------- training loop


def add_gaussian_noise(images: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """``images + sigma * e``, ``e ~ N(0, I)`` drawn from ``generator`` (Cohen et al. 2019's
    augmentation, in [0, 1] pixel space and without clipping, as at certification time)."""
    if sigma == 0:
        return images
    noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    return images + sigma * noise


def _train_one_epoch(model: nn.Module, batches: "_Batches", optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler, config: TrainConfig,
                     noise_generator: torch.Generator, description: str, show_progress: bool) -> tuple[float, float]:
    """One pass; returns (mean cross-entropy, accuracy) on the noisy training inputs."""
    from tqdm import tqdm

    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=batches.device)
    correct = torch.zeros((), dtype=torch.int64, device=batches.device)
    seen = 0
    for images, labels in tqdm(batches, desc=description, disable=not show_progress, leave=False):
        noisy = add_gaussian_noise(images, config.sigma, noise_generator)
        logits = model(noisy)
        loss = nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if config.lr_schedule == "cosine":
            scheduler.step()
        # Accumulate on the device: no host synchronization per batch.
        loss_sum += loss.detach().double() * labels.shape[0]
        correct += (logits.detach().argmax(dim=1) == labels).sum()
        seen += labels.shape[0]
    return float(loss_sum) / seen, int(correct) / seen


@torch.no_grad()
def _test_accuracies(model: nn.Module, batches: "_Batches", config: TrainConfig, device: torch.device,
                     show_progress: bool) -> dict[str, Any]:
    """Accuracy of f on clean test images and on one noisy copy of each (``x + sigma * e``).

    The noise comes from a generator seeded with ``seed + 2``, fresh at each call, so the numbers
    do not depend on how far training went or whether it was resumed.
    """
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    noise_generator = torch.Generator(device=device).manual_seed(config.seed + 2)
    clean_correct = torch.zeros((), dtype=torch.int64, device=device)
    noisy_correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    for images, labels in tqdm(batches, desc="test", disable=not show_progress, leave=False):
        clean_correct += (model(images).argmax(dim=1) == labels).sum()
        noisy = add_gaussian_noise(images, config.sigma, noise_generator)
        noisy_correct += (model(noisy).argmax(dim=1) == labels).sum()
        seen += labels.shape[0]
    model.train(was_training)
    return {"test_clean_accuracy": int(clean_correct) / seen, "test_noisy_accuracy": int(noisy_correct) / seen,
            "test_samples": seen}


class _Batches:
    """Batches ``(images [B, C, H, W] on device, labels [B] on device)`` of the first ``limit`` items.

    Data sets held in memory with a ``get_batch(indices)`` method (MNIST) are indexed a batch at a
    time; others go through a DataLoader. Shuffling draws one permutation per epoch from
    ``generator`` in both cases, so saving the generator's state at an epoch boundary fixes the
    order of every later epoch.
    """

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool, generator: torch.Generator | None,
                 limit: int | None, num_workers: int, device: torch.device):
        self.dataset = dataset
        self.size = len(dataset) if limit is None else min(limit, len(dataset))
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator
        self.device = device
        self.loader = None
        if not hasattr(dataset, "get_batch"):
            subset = dataset if self.size == len(dataset) else Subset(dataset, range(self.size))
            self.loader = DataLoader(subset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                                     num_workers=num_workers, pin_memory=device.type == "cuda")

    def __len__(self) -> int:
        return math.ceil(self.size / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.loader is not None:
            for images, labels in self.loader:
                yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            return
        order = torch.randperm(self.size, generator=self.generator) if self.shuffle else torch.arange(self.size)
        for start in range(0, self.size, self.batch_size):
            images, labels = self.dataset.get_batch(order[start:start + self.batch_size])
            yield images.to(self.device), labels.to(self.device)


def _make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    if config.lr_schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_step_size, gamma=config.lr_gamma)
    # Stepped per batch: a short run (a few epochs) still gets a smooth decay.
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps_per_epoch)


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device {device!r} is not a torch device: {error}") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available")
    return resolved


# ------------------------------------------------------------------------- checkpoints and log


def _save_checkpoint(path: Path, config: TrainConfig, metadata: dict, model: nn.Module,
                     optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                     epoch: int, train_seconds: float, data_generator: torch.Generator,
                     noise_generator: torch.Generator, device: torch.device) -> None:
    """Everything a resumed run needs, as tensors and plain containers (weights_only-loadable)."""
    rng = {
        "torch": torch.get_rng_state(),
        "data": data_generator.get_state(),
        "noise": noise_generator.get_state(),
    }
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    checkpoint = {
        "arch": config.arch,
        "state_dict": model.state_dict(),
        "arq_metadata": dict(metadata, epoch=epoch),
        "config": config.to_dict(),
        "epoch": epoch,
        "train_seconds": train_seconds,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng,
    }
    partial = path.with_name(path.name + ".partial")
    torch.save(checkpoint, partial)
    os.replace(partial, path)  # atomic: an interruption never leaves a half-written checkpoint


def _restore(path: Path, config: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler, data_generator: torch.Generator,
             noise_generator: torch.Generator, device: torch.device) -> tuple[int, float]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt or foreign file: say which one
        raise ValueError(f"cannot resume from {path}: {error}") from error
    saved = checkpoint.get("config", {})
    differing = [f"{name} (checkpoint {saved.get(name)!r}, now {getattr(config, name)!r})"
                 for name in _RESULT_FIELDS if saved.get(name) != getattr(config, name)]
    if differing:
        raise ValueError(f"cannot resume from {path}: the run's settings differ: {'; '.join(differing)}")
    model.load_state_dict(checkpoint["state_dict"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    rng = checkpoint["rng"]
    if rng["noise"].numel() != noise_generator.get_state().numel():  # CPU and CUDA generators differ
        raise ValueError(f"cannot resume from {path}: its noise generator's state comes from another device type "
                         f"than {device.type}; resume on the kind of device the run started on (--device)")
    torch.set_rng_state(rng["torch"])
    data_generator.set_state(rng["data"])
    noise_generator.set_state(rng["noise"])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)
    return int(checkpoint["epoch"]), float(checkpoint.get("train_seconds", 0.0))


def _append_log(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def _truncate_log(path: Path, completed_epochs: int) -> None:
    """Keep the log lines of epochs ``<= completed_epochs``: a resumed run rewrites the rest."""
    if not path.is_file():
        return
    kept = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):  # cut short by the interruption being resumed from: rewritten
                warnings.warn(f"{path}: dropped its last line, cut short: {line!r}", stacklevel=2)
                continue
            raise ValueError(f"{path}:{number}: not a JSON log record: {line!r}") from None
        if "epoch" in record and record["epoch"] <= completed_epochs:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
