"""``arq demo``: certify, quantize and certify again on the shipped MNIST models, offline."""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    from arq.demo import DEFAULT_OUT, DemoConfig

    defaults = DemoConfig()
    parser = subparsers.add_parser(
        "demo",
        help="run the whole pipeline on a shipped MNIST model (offline; 1.5-5 min on 2 cores)",
        description="Certify a shipped MNIST model, quantize it (uniform W8A8 and W4A4, and the zoo's ARQ "
                    "policy), certify each quantized model on the same noise, and print one table; offline.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default=defaults.model, help="zoo name (see `arq zoo`)")
    parser.add_argument("--images", type=int, default=defaults.images, help="test images to certify")
    parser.add_argument("--n", type=int, default=defaults.n, help="CERTIFY's n (estimation samples)")
    parser.add_argument("--n0", type=int, default=defaults.n0, help="CERTIFY's n0 (selection samples)")
    parser.add_argument("--alpha", type=float, default=defaults.alpha, help="failure probability")
    parser.add_argument("--batch", type=int, default=defaults.batch_size, help="noisy samples per forward pass")
    parser.add_argument("--finetune-steps", type=int, default=defaults.finetune_steps,
                        help="noise-augmented fine-tuning steps for the low-bit models (0: none)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="noise seed")
    return parser


def run(args) -> int:
    import torch

    from arq.demo import DemoConfig, run_demo

    torch.set_num_threads(max(1, torch.get_num_threads()))
    from arq.cli.common import CommandError

    from arq.zoo import path_of

    try:  # the settings, checked before any work: DemoConfig and the zoo name the option
        config = DemoConfig(model=args.model, images=args.images, n=args.n, n0=args.n0, alpha=args.alpha,
                            batch_size=args.batch, finetune_steps=args.finetune_steps, out=args.out, seed=args.seed)
        path_of(config.model)
    except ValueError as error:
        raise CommandError(str(error)) from None
    run_demo(config)
    return 0
