"""``arq demo``: the whole pipeline on the embedded default, offline.

Loads a shipped noise-trained MNIST model, certifies a fixed sample of test
images (CERTIFY, Cohen et al. 2019), quantizes the model (uniform W8A8 and
W4A4, and the ARQ policy when one is shipped for it), certifies each
quantized model on the same images with the same noise, and writes one table:
clean accuracy, certified accuracy at several radii, ACR, BitOPs as a share of
FP32, time. Outputs: one TSV per model (the ``arq certify`` format), the table
(markdown), and a certified-accuracy plot (PNG).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

DEFAULT_OUT = Path("arq-out") / "demo"


@dataclass
class DemoConfig:
    """Settings of ``arq demo``.

    Args:
        model: a zoo name (``arq zoo`` lists them).
        images: test images certified, spread evenly over the MNIST test set.
        n, n0, alpha, batch_size: CERTIFY's parameters.
        radii: radii of the certified-accuracy columns.
        calibration_images: training images used to calibrate activation ranges.
        finetune_steps: SGD steps of noise-augmented fine-tuning for the low-bit models
            (0 turns fine-tuning off).
        out: output folder.
        seed: the noise seed.
    """

    model: str = "mnist-lenet-sigma0.25"
    images: int = 100
    n: int = 10_000
    n0: int = 100
    alpha: float = 0.001
    batch_size: int = 1000
    radii: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    calibration_images: int = 512
    finetune_steps: int = 200
    out: Path = field(default_factory=lambda: DEFAULT_OUT)
    seed: int = 0
    variants: tuple[str, ...] = ("FP32", "W8A8", "W4A4", "ARQ")

    def __post_init__(self) -> None:
        for name in ("images", "n", "n0", "batch_size", "calibration_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.finetune_steps < 0:
            raise ValueError(f"finetune_steps must be >= 0, got {self.finetune_steps}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        self.out = Path(self.out)


def _quantized_variants(model, config: DemoConfig, train_x, train_y):
    """Yields (label, model, policy) for the quantized models the demo certifies."""
    from arq import zoo
    from arq.quant import FinetuneConfig, Policy, quantize

    calibration = train_x[: config.calibration_images]
    finetune = None
    if config.finetune_steps:
        finetune = FinetuneConfig(epochs=1, max_steps=config.finetune_steps, seed=config.seed)
    policies = []
    if "W8A8" in config.variants:
        policies.append(("W8A8", Policy.uniform(model, 8, 8), None))
    if "W4A4" in config.variants:
        policies.append(("W4A4", Policy.uniform(model, 4, 4), finetune))
    if "ARQ" in config.variants:
        arq_policy = zoo.arq_policy(config.model)
        if arq_policy is not None:
            policies.append(("ARQ", arq_policy, finetune))
    for label, policy, tune in policies:
        quantized = quantize(model, policy, calibration, finetune=tune, train_data=(train_x, train_y))
        yield label, quantized, policy


def run_demo(config: DemoConfig, *, log=print) -> list[dict]:
    """Runs the demo; returns one summary row per model and writes the outputs into ``config.out``."""
    import arq
    from arq import analyze, zoo
    from arq.data import get_dataset
    from arq.quant import bitops

    config.out.mkdir(parents=True, exist_ok=True)
    model = zoo.load(config.model)
    sigma = model.arq_metadata["sigma"]
    test = get_dataset("mnist", "test")
    step = max(1, len(test) // config.images)
    indices = list(range(0, len(test), step))[: config.images]
    images = torch.stack([test[i][0] for i in indices])
    labels = [int(test[i][1]) for i in indices]
    train = get_dataset("mnist", "train")
    generator = torch.Generator().manual_seed(config.seed)
    train_order = torch.randperm(len(train), generator=generator)[: max(config.calibration_images, 8192)]
    train_x = torch.stack([train[int(i)][0] for i in train_order])
    train_y = torch.tensor([int(train[int(i)][1]) for i in train_order])
    input_shape = (1, *images.shape[1:])

    log(f"arq demo: {config.model} (sigma={sigma}), {len(indices)} MNIST test images, n={config.n}, "
        f"n0={config.n0}, alpha={config.alpha}; output in {config.out}")
    variants = [("FP32", model, None)] if "FP32" in config.variants else []
    summaries = []
    results = {}

    def certify_variant(label, net, policy, prepare_seconds):
        path = config.out / f"{label}.tsv"
        start = time.perf_counter()
        with open(path, "w") as tsv:
            print("idx\tlabel\tpredict\tradius\tcorrect\ttime", file=tsv, flush=True)
            for index, image, target in zip(indices, images, labels):
                began = time.perf_counter()
                cert = arq.certify(net, image, sigma=sigma, n=config.n, n0=config.n0, alpha=config.alpha,
                                   batch_size=config.batch_size, seed=config.seed, input_index=index)
                print(f"{index}\t{target}\t{cert.prediction}\t{cert.radius:.4f}\t{int(cert.prediction == target)}"
                      f"\t{time.perf_counter() - began:.3f}", file=tsv, flush=True)
        seconds = time.perf_counter() - start
        rows = analyze.read_results(path)
        results[label] = rows
        with torch.inference_mode():
            clean = (net.eval()(images).argmax(1) == torch.tensor(labels)).float().mean().item()
        share = 1.0 if policy is None else bitops(model, policy, input_shape).fraction_of_fp32
        summary = {
            "model": label,
            "clean_accuracy": clean,
            **{f"r={r:g}": a for r, a in zip(config.radii, analyze.certified_accuracy(rows, config.radii))},
            "ACR": analyze.average_certified_radius(rows),
            "bitops_share": share,
            "prepare_s": prepare_seconds,
            "certify_s": seconds,
        }
        summaries.append(summary)
        log(f"  {label}: ACR {summary['ACR']:.3f}, certified accuracy at r=0 {summary['r=0']:.2f}, "
            f"BitOPs {100 * share:.2f} % of FP32, {seconds:.0f} s")

    for label, net, policy in variants:
        certify_variant(label, net, policy, 0.0)
    started = time.perf_counter()
    for label, net, policy in _quantized_variants(model, config, train_x, train_y):
        prepare = time.perf_counter() - started
        certify_variant(label, net, policy, prepare)
        started = time.perf_counter()

    table = format_summary(summaries, config.radii)
    (config.out / "table.md").write_text(table + "\n")
    (config.out / "summary.json").write_text(json.dumps(
        {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
         "rows": summaries}, indent=2))
    analyze.plot_certified_accuracy(results, config.out / "certified_accuracy.png", config.radii,
                                    envelope_label=None,
                                    title=f"{config.model}: certified accuracy (n={config.n})")
    log("")
    log(table)
    log("")
    log(f"wrote {config.out}/{{FP32,W8A8,W4A4,...}}.tsv, table.md, summary.json, certified_accuracy.png")
    return summaries


def format_summary(summaries: list[dict], radii) -> str:
    """The demo's table in markdown."""
    radius_columns = [f"r={r:g}" for r in radii]
    header = ["model", "clean acc", *radius_columns, "ACR", "BitOPs % FP32", "time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summaries:
        cells = [row["model"], f"{row['clean_accuracy']:.3f}", *[f"{row[c]:.3f}" for c in radius_columns],
                 f"{row['ACR']:.3f}", f"{100 * row['bitops_share']:.2f}",
                 f"{row['prepare_s'] + row['certify_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
