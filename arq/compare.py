"""ARQ's evaluation: full certification of float, uniform and searched quantized models.

For one noise-trained model f and one BitOPs budget, certify on a fixed test subset with
CERTIFY (Cohen et al. 2019; n = 100,000, n0 = 100, alpha = 0.001 by default):

* ``float``: f itself;
* ``W8A8`` and ``W4A4``: uniform policies;
* ``HAQ``: the best policy of a search with the clean-accuracy reward (Wang et al. 2019);
* ``ARQ``: the best policy of a search with the IRS certified-radius reward (Yang et al. 2024),

every quantized model calibrated and fine-tuned under noise the same way. The table has
per model: clean accuracy of the base classifier on the clean subset, certified accuracy at
each radius r (``#{correct and R >= r} / N``), ACR (``(1/N) sum R [correct]``), the BitOPs
share of FP32 and the search time; then each searched model's ACR difference to the float
model and to each uniform baseline, paired on the same images, with a bootstrap interval
(:func:`paired_acr_difference`), since at a few hundred images a difference of a few
thousandths is noise. One certify TSV per model (``arq analyze`` reads them),
the table (Markdown and CSV) and a plot of certified accuracy against radius are written
to the output folder. Every step resumes: searches from their checkpoints, certification
after the last complete TSV row.

A full-scale run takes hours per row on a CPU. ``only`` splits it across processes that share
the output folder: each certifies some rows (each row has its own TSV and policy file, and
every row is deterministic: its own seeded calibration, fine-tuning and counter-based noise,
whatever ran before it in the process), and a last call without ``only`` finds every row
complete and writes the table and plot.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import re
import sys
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from arq.quant import FinetuneConfig, Policy, QuantConfig, quantize
from arq.search.budget import policy_share

__all__ = ["CompareConfig", "ModelRow", "PairedDifference", "certify_rows", "check_rows", "compare",
           "format_compare_table", "format_paired_differences", "paired_acr_difference", "paired_differences",
           "table_rows", "test_subset", "uniform_label"]

HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime"
DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


@dataclass
class CompareConfig:
    """Settings of :func:`compare`.

    Args:
        images: size of the fixed test subset: indices ``0, s, 2s, ...`` with ``s = len(test) // images``.
        n, n0, alpha: CERTIFY's estimation samples, selection samples and failure probability.
        batch_size: noisy samples per forward pass.
        seed: the noise seed (and the fine-tuning's).
        radii: radii of the certified-accuracy columns.
        finetune_steps: SGD steps of the fine-tuning every compared quantized model gets.
        finetune_lr, finetune_batch_size: its learning rate and batch size.
        train_images: the first training images used for that fine-tuning and the calibration.
        calibration_images: how many of them calibrate the activation ranges.
        uniform: the uniform ``(w_bits, a_bits)`` baselines.
    """

    images: int = 500
    n: int = 100_000
    n0: int = 100
    alpha: float = 0.001
    batch_size: int = 1000
    seed: int = 0
    radii: Sequence[float] = DEFAULT_RADII
    finetune_steps: int = 200
    finetune_lr: float = 1e-3
    finetune_batch_size: int = 128
    train_images: int = 2000
    calibration_images: int = 256
    uniform: Sequence[tuple[int, int]] = ((8, 8), (4, 4))

    def __post_init__(self) -> None:
        for name in ("images", "n", "n0", "batch_size", "finetune_batch_size", "train_images", "calibration_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.finetune_steps < 0:
            raise ValueError(f"finetune_steps must be >= 0, got {self.finetune_steps}")
        self.uniform = tuple(tuple(pair) for pair in self.uniform)
        for pair in self.uniform:
            if len(pair) != 2 or not all(isinstance(b, int) and 2 <= b <= 8 for b in pair):
                raise ValueError(f"uniform must hold (w_bits, a_bits) pairs of ints in 2..8, got {pair!r}")


@dataclass
class ModelRow:
    """One compared model: its certify rows and what the table shows about it."""

    label: str
    rows: list = field(default_factory=list)
    clean_accuracy: float = math.nan
    bitops_share: float = 1.0
    search_seconds: float | None = None
    policy: Policy | None = None


def test_subset(length: int, images: int) -> list[int]:
    """``images`` indices spread evenly over a split of ``length``: ``0, s, 2s, ...``, ``s = length // images``."""
    if isinstance(images, bool) or not isinstance(images, numbers.Integral) or images < 1:
        raise ValueError(f"images must be a positive integer, got {images!r}")
    if images > length:
        raise ValueError(f"images ({images}) exceeds the {length} test images")
    skip = length // images
    return list(range(0, skip * images, skip))


def _read_done(path: str) -> list:
    from arq.analyze import read_results

    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return []
    with open(path, "rb") as handle:  # drop a partial last line: its row is certified again
        content = handle.read()
    end = content.rfind(b"\n") + 1
    if end < len(content):
        with open(path, "r+b") as handle:
            handle.truncate(end)
    return read_results(path)


def certify_rows(model: nn.Module, test_set, indices: Sequence[int], path: str, config: CompareConfig,
                 *, progress: bool = False, device=None, settings: dict | None = None) -> list:
    """CERTIFY ``model`` on ``test_set[indices]``, appending rows to the TSV ``path`` (resuming after its
    complete rows, which must be the first of ``indices``); returns every row as ``arq.analyze.ResultRow``.

    ``path.run.json`` (:mod:`arq.run_record`) keeps what the rows depend on: the model's weights
    (sha256: a quantized model's after calibration and fine-tuning), CERTIFY's settings, the
    model's sigma and execution (``arq.smoothing.engine.execution_record``), and the caller's ``settings``
    (JSON-able: how the model was made); resuming under other ones raises
    :class:`arq.run_record.RunRecordMismatch`."""
    from arq.analyze import ResultRow
    from arq.run_record import check_run_record, weights_sha256
    from arq.smoothing.core import certify
    from arq.smoothing.engine import execution_record, prepare_model

    done = _read_done(path)
    if [row.idx for row in done] != list(indices[:len(done)]):
        raise ValueError(f"{path} holds rows for other test indices: delete it or use the same --images")
    rows = list(done)
    remaining = list(indices[len(done):])
    # one image's samples stay below the engine's compile threshold: showing it the whole
    # remaining run compiles a quantized model's integer form once, when that repays it
    first = next(model.parameters(), None)
    model_device = device if device is not None else (first.device if first is not None else torch.device("cpu"))
    prepared, tag = prepare_model(model, "auto", model_device, work=len(remaining) * (config.n + config.n0))
    sigma = (getattr(model, "arq_metadata", None) or {}).get("sigma")
    record = {"model": weights_sha256(model), "n": config.n, "n0": config.n0, "alpha": config.alpha, "seed": config.seed,
              "sigma": None if sigma is None else float(sigma), **execution_record(prepared, tag), **(settings or {})}
    check_run_record(path, record, has_rows=bool(done))
    from tqdm import tqdm

    with open(path, "a", encoding="utf-8") as output:
        if output.tell() == 0:
            output.write(HEADER + "\n")
        for index in tqdm(remaining, disable=not progress, unit="image", file=sys.stderr,
                          desc=os.path.basename(path)):
            x, label = test_set[index]
            started = time.perf_counter()
            certificate = certify(model, x, n=config.n, n0=config.n0, alpha=config.alpha,
                                  batch_size=config.batch_size, seed=config.seed, input_index=index, device=device)
            elapsed = time.perf_counter() - started
            correct = int(certificate.prediction == int(label))
            output.write(f"{index}\t{int(label)}\t{certificate.prediction}\t{certificate.radius!r}\t{correct}\t"
                         f"{elapsed:.3f}\n")
            output.flush()
            os.fsync(output.fileno())
            rows.append(ResultRow(index, int(label), certificate.prediction, certificate.radius, correct, elapsed))
    return rows


@torch.no_grad()
def _clean_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    device = next(model.parameters()).device
    predictions = torch.cat([model(batch.to(device)).argmax(1).cpu() for batch in images.split(256)])
    return float((predictions == labels).float().mean())


def format_compare_table(models: Sequence[ModelRow], radii: Sequence[float], fmt: str = "md") -> str:
    """One row per model: clean accuracy, certified accuracy at each radius, ACR, BitOPs share, search time."""
    from arq.analyze import average_certified_radius, certified_accuracy

    header = ["model", "clean acc"] + [f"r={r:g}" for r in radii] + ["ACR", "BitOPs share", "search time (s)"]
    table = []
    for model in models:
        search = "-" if model.search_seconds is None else f"{model.search_seconds:.0f}"
        values = [model.clean_accuracy] + certified_accuracy(model.rows, radii) + [average_certified_radius(model.rows)]
        table.append((model.label, values, model.bitops_share, search))
    if fmt == "csv":  # csv quotes a label holding a comma
        import csv
        import io

        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        for label, values, share, search in table:
            writer.writerow([label] + [repr(float(v)) for v in values] + [repr(share), search])
        return buffer.getvalue()
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for label, values, share, search in table:
        cells = [label.replace("|", "\\|")] + [f"{v:.3f}" for v in values] + [f"{share:.5f}", search]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@dataclass
class PairedDifference:
    """ACR of ``label`` minus ACR of ``reference`` on the same test images, with a bootstrap interval."""

    label: str
    reference: str
    difference: float
    low: float
    high: float
    wins: int
    losses: int
    images: int


def paired_acr_difference(rows: Sequence, reference_rows: Sequence, *, level: float = 0.95,
                          resamples: int = 2000, seed: int = 0) -> tuple[float, float, float, int, int]:
    """``(mean d, low, high, wins, losses)`` of ``d_i = r_i - r'_i`` over the images both certified.

    ``r_i`` is image i's certified radius when correct, else 0 (so ``mean d`` is the ACR
    difference); ``low, high`` is the percentile bootstrap interval at ``level`` (images
    resampled with replacement, ``resamples`` times, seeded); wins and losses count the
    images where ``r_i > r'_i`` and ``r_i < r'_i``. The interval is about the sampling of test
    images only: each certificate itself holds with probability ``1 - alpha``.
    """
    from arq.analyze import _certified_radii

    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 < level < 1.0:
        raise ValueError(f"level must be a confidence level in (0, 1), got {level!r}")
    if isinstance(resamples, bool) or not isinstance(resamples, numbers.Integral) or resamples < 1:
        raise ValueError(f"resamples must be a positive integer, got {resamples!r}")
    if len(rows) == 0:
        raise ValueError("paired rows are empty: no image to compare")
    if [row.idx for row in rows] != [row.idx for row in reference_rows]:
        raise ValueError("paired rows must be for the same test indices, in the same order")
    values = torch.tensor([max(v, 0.0) for v in _certified_radii(rows)], dtype=torch.float64)
    reference = torch.tensor([max(v, 0.0) for v in _certified_radii(reference_rows)], dtype=torch.float64)
    differences = values - reference
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(differences), (resamples, len(differences)), generator=generator)
    means = differences[picks].mean(dim=1).sort().values
    tail = (1.0 - level) / 2.0
    low = float(means[int(math.floor(tail * (resamples - 1)))])
    high = float(means[int(math.ceil((1.0 - tail) * (resamples - 1)))])
    return float(differences.mean()), low, high, int((differences > 0).sum()), int((differences < 0).sum())


def paired_differences(models: Sequence[ModelRow], searched: Sequence[str]) -> list[PairedDifference]:
    """Every searched model against the float model, every uniform baseline and the searched
    models listed before it (ARQ against HAQ)."""
    by_label = {model.label: model for model in models}
    result = []
    for position, label in enumerate(searched):
        for reference in models:
            if label not in by_label or reference.label == label or reference.label in searched[position:]:
                continue
            difference, low, high, wins, losses = paired_acr_difference(by_label[label].rows, reference.rows)
            result.append(PairedDifference(label, reference.label, difference, low, high, wins, losses,
                                           len(reference.rows)))
    return result


def format_paired_differences(differences: Sequence[PairedDifference]) -> str:
    lines = ["Paired on the same test images (radius when correct, else 0):", "",
             "| model | vs | ACR difference | 95 % bootstrap interval | images better / worse |",
             "|---|---|---:|---|---|"]
    for d in differences:
        lines.append(f"| {d.label} | {d.reference} | {d.difference:+.4f} | [{d.low:+.4f}, {d.high:+.4f}] | "
                     f"{d.wins} / {d.losses} of {d.images} |")
    return "\n".join(lines) + "\n"


def uniform_label(w_bits: int, a_bits: int) -> str:
    """A uniform baseline's row: ``W4A4``."""
    return f"W{w_bits}A{a_bits}"


def table_rows(uniform: Sequence[tuple[int, int]], searched: Sequence[str]) -> list[str]:
    """The table's rows in order: ``float``, each uniform baseline, the searched labels."""
    return ["float"] + [uniform_label(w, a) for w, a in uniform] + list(searched)


def check_rows(only: Collection[str], labels: Sequence[str], name: str = "only") -> None:
    """ValueError naming ``name`` unless ``only`` is a non-empty selection of ``labels``."""
    unknown = sorted(set(only) - set(labels))
    if unknown or not only:
        raise ValueError(f"{name} must name rows of this comparison ({', '.join(labels)}), got "
                         f"{', '.join(unknown) if unknown else 'none'}")


def compare(
    model: nn.Module,
    train_set,
    test_set,
    out_dir: str | os.PathLike,
    config: CompareConfig,
    *,
    policies: dict[str, Policy | Callable[[], tuple[Policy, float | None]]],
    progress: bool = False,
    only: Collection[str] | None = None,
) -> list[ModelRow]:
    """Certify the float model, the uniform baselines and ``policies`` (module docstring).

    Args:
        model: the float model f (eval mode, ``arq_metadata["sigma"]``).
        train_set, test_set: the data set's splits (``(image, label)`` items).
        out_dir: where the TSVs, ``compare.md``, ``compare.csv`` and ``compare.png`` go.
        config: :class:`CompareConfig`.
        policies: ``{label: Policy}`` or ``{label: callable returning (Policy, search seconds)}``
            (a search run only when needed), e.g. ``{"HAQ": ..., "ARQ": ...}``.
        progress: show a progress bar per row.
        only: certify just these rows (``"float"``, ``"W4A4"``, ``"HAQ"``, ...) and write no
            table (module docstring); ``None``: every row, then the table and plot.
    Returns:
        The :class:`ModelRow` of every model certified, in table order.
    """
    from arq.analyze import plot_certified_accuracy
    from arq.search.run import take

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    metadata = getattr(model, "arq_metadata", None) or {}
    sigma = metadata.get("sigma")
    if sigma is None:
        raise ValueError("model.arq_metadata['sigma'] is required: compare certifies at the model's noise level")
    named: list[tuple[str, Policy | Callable]] = [
        (uniform_label(w, a), Policy.uniform(model, w, a)) for w, a in config.uniform] + list(policies.items())
    taken = {"float"} | {uniform_label(w, a) for w, a in config.uniform}
    for label in policies:  # labels name the rows' files (certify_<label>.tsv, policy_<label>.json)
        if label in taken or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", label):
            raise ValueError(f"policies: label {label!r} must differ from 'float' and the uniform rows "
                             f"({', '.join(sorted(taken - {'float'}))}) and be a file-name-safe word "
                             "(letters, digits, _ . + -)")
    if only is not None:
        check_rows(only, table_rows(config.uniform, list(policies)))
    indices = test_subset(len(test_set), config.images)
    test_images, test_labels = take(test_set, indices)
    input_shape = tuple(test_images.shape[1:])
    if config.train_images > len(train_set):
        raise ValueError(f"train_images ({config.train_images}) exceeds the {len(train_set)} training images")
    train_images, train_labels = take(train_set, range(config.train_images))
    finetune = None
    if config.finetune_steps > 0:
        finetune = FinetuneConfig(
            epochs=max(1, -(-config.finetune_steps * config.finetune_batch_size // config.train_images)),
            lr=config.finetune_lr, batch_size=config.finetune_batch_size, max_steps=config.finetune_steps,
            sigma=float(sigma), seed=config.seed)
    quant_config = QuantConfig(calibration_sigma=float(sigma), seed=config.seed)

    # how each compared quantized model is made (its policy is recorded per row)
    making = {"finetune_steps": config.finetune_steps, "finetune_lr": config.finetune_lr,
              "finetune_batch_size": config.finetune_batch_size, "train_images": config.train_images,
              "calibration_images": config.calibration_images}

    def certified(label: str, candidate: nn.Module, share: float, seconds, policy) -> ModelRow:
        path = os.path.join(out_dir, f"certify_{label}.tsv")
        settings = {} if policy is None else {**making, "policy": policy.to_dict()}
        rows = certify_rows(candidate, test_set, indices, path, config, progress=progress, settings=settings)
        return ModelRow(label, rows, _clean_accuracy(candidate, test_images, test_labels), share, seconds, policy)

    results = [certified("float", model.eval(), 1.0, None, None)] if only is None or "float" in only else []
    for label, policy in named:
        if only is not None and label not in only:
            continue  # another process certifies it; its search, if any, is not run here
        seconds = None
        if callable(policy) and not isinstance(policy, Policy):
            policy, seconds = policy()
        policy.save(os.path.join(out_dir, f"policy_{label}.json"))
        candidate = quantize(model, policy, train_images[:config.calibration_images], finetune=finetune,
                             train_data=(train_images, train_labels) if finetune else None, config=quant_config)
        results.append(certified(label, candidate, policy_share(model, policy, input_shape), seconds, policy))
    if only is not None:
        return results  # the table needs every row: a call without ``only`` writes it

    table = format_compare_table(results, config.radii)
    paired = paired_differences(results, [label for label, _ in named[len(config.uniform):]])
    with open(os.path.join(out_dir, "compare.md"), "w", encoding="utf-8") as handle:
        handle.write(table)
        if paired:
            handle.write("\n" + format_paired_differences(paired))
    with open(os.path.join(out_dir, "compare.csv"), "w", encoding="utf-8") as handle:
        handle.write(format_compare_table(results, config.radii, fmt="csv"))
    with open(os.path.join(out_dir, "compare.json"), "w", encoding="utf-8") as handle:
        json.dump({"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(config).items()},
                   "indices": indices}, handle, indent=2, default=list)
    plot_certified_accuracy({r.label: r.rows for r in results}, os.path.join(out_dir, "compare.png"),
                            list(config.radii), envelope_label=None,
                            title=f"certified accuracy, sigma = {sigma:g}")
    return results
