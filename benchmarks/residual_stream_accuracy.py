"""What an 8-bit residual stream (``QuantConfig(residual_bits=8)``) costs in certified robustness.

A residual network is trained under noise (``arq train --arch mnist_resnet``, vendored MNIST), then
quantized uniformly with and without the quantized residual stream (with and without its shortcut
quantizers, ``QuantConfig.residual_shortcuts``), every quantized model calibrated
and fine-tuned the same way (``arq compare``'s recipe: 200 SGD steps under noise), and all of them are
certified on the same test images with the same noise (``arq.compare.certify_rows``). The table has
clean accuracy, certified accuracy and ACR; the paired ACR differences (stream quantized minus float
stream) come with 95 % bootstrap intervals over the images.

Run::

    arq train --dataset mnist --arch mnist_resnet --sigma 0.25 --epochs 3 --out runs/mres --threads 2
    python benchmarks/residual_stream_accuracy.py runs/mres/mnist-resnet-sigma0.25.safetensors OUT_DIR

Rows are written to ``OUT_DIR/<model>.tsv`` as they are certified; a rerun resumes them.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

import arq
from arq.analyze import average_certified_radius, certified_accuracy
from arq.compare import CompareConfig, _clean_accuracy, certify_rows, paired_acr_difference, test_subset
from arq.data import get_dataset
from arq.models import load_checkpoint
from arq.quant import FinetuneConfig, Policy, QuantConfig

RADII = (0.0, 0.25, 0.5, 0.75)
VARIANTS = {  # label -> (w_bits, a_bits, residual_bits, residual_shortcuts) or None for the float model
    "FP32": None,
    "W8A8": (8, 8, 32, False), "W8A8-r8": (8, 8, 8, False), "W8A8-r8-shortcuts": (8, 8, 8, True),
    "W4A4": (4, 4, 32, False), "W4A4-r8": (4, 4, 8, False), "W4A4-r8-shortcuts": (4, 4, 8, True),
}
PAIRS = (("W8A8-r8", "W8A8"), ("W4A4-r8", "W4A4"), ("W8A8-r8-shortcuts", "W8A8"), ("W4A4-r8-shortcuts", "W4A4"),
         ("W8A8-r8-shortcuts", "W8A8-r8"), ("W4A4-r8-shortcuts", "W4A4-r8"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--n", type=int, default=1000)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    config = CompareConfig(images=args.images, n=args.n, n0=100, batch_size=400)
    model = load_checkpoint(args.checkpoint)
    sigma = model.arq_metadata["sigma"]
    train, test = get_dataset("mnist", "train"), get_dataset("mnist", "test")
    train_images = torch.stack([train[i][0] for i in range(config.train_images)])
    train_labels = torch.tensor([int(train[i][1]) for i in range(config.train_images)])
    clean_images = torch.stack([test[i][0] for i in range(2000)])
    clean_labels = torch.tensor([int(test[i][1]) for i in range(2000)])
    indices = test_subset(len(test), config.images)
    rows, summary = {}, {"checkpoint": args.checkpoint, "sigma": sigma, "images": config.images, "n": config.n,
                         "n0": config.n0, "alpha": config.alpha, "models": {}}
    for label, bits in VARIANTS.items():
        if bits is None:
            net = model
        else:
            w_bits, a_bits, residual_bits, shortcuts = bits
            net = arq.quantize(model, Policy.uniform(model, w_bits, a_bits), train_images[:config.calibration_images],
                               config=QuantConfig(residual_bits=residual_bits, residual_shortcuts=shortcuts,
                                                  seed=config.seed),
                               finetune=FinetuneConfig(max_steps=config.finetune_steps, lr=config.finetune_lr,
                                                       batch_size=config.finetune_batch_size, seed=config.seed),
                               train_data=(train_images, train_labels))
        rows[label] = certify_rows(net, test, indices, os.path.join(args.out, f"{label}.tsv"), config)
        summary["models"][label] = {
            "clean_accuracy": _clean_accuracy(net, clean_images, clean_labels),
            "certified_accuracy": dict(zip(map(str, RADII), certified_accuracy(rows[label], RADII))),
            "acr": average_certified_radius(rows[label]),
        }
        print(label, json.dumps(summary["models"][label]), flush=True)
    summary["paired_acr_differences"] = {}
    for label, reference in PAIRS:
        mean, low, high, wins, losses = paired_acr_difference(rows[label], rows[reference])
        summary["paired_acr_differences"][f"{label} - {reference}"] = {
            "difference": mean, "low": low, "high": high, "wins": wins, "losses": losses}
        print(f"{label} - {reference}: {mean:+.4f} [{low:+.4f}, {high:+.4f}] ({wins} better, {losses} worse)")
    with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)


if __name__ == "__main__":
    main()
