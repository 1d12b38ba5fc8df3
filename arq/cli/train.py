"""``arq train``: Gaussian-noise training of a base classifier (see :mod:`arq.train`).

Example: ``arq train --dataset mnist --arch lenet --sigma 0.25 --epochs 10 --out runs/lenet-0.25``
"""
from __future__ import annotations

import argparse
import json
import sys


def add_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train",
        help="train a base classifier with Gaussian noise augmentation",
        description="Train a base classifier with Gaussian noise augmentation (Cohen et al. 2019). "
        "Writes checkpoint.pt, log.jsonl and <name>.safetensors to --out.",
    )
    _add_arguments(parser)
    parser.set_defaults(run=run)
    return parser


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    from arq.data import DATASETS
    from arq.models import ARCHITECTURES
    from arq.train import LR_SCHEDULES, TrainConfig

    defaults = TrainConfig.__dataclass_fields__
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--arch", required=True, choices=list(ARCHITECTURES))
    parser.add_argument("--sigma", required=True, type=float, help="noise level, in [0, 1] pixel units")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--epochs", type=int, default=defaults["epochs"].default)
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"].default)
    parser.add_argument("--lr", type=float, default=defaults["lr"].default, help="initial learning rate")
    parser.add_argument("--momentum", type=float, default=defaults["momentum"].default)
    parser.add_argument("--weight-decay", type=float, default=defaults["weight_decay"].default)
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=defaults["lr_schedule"].default)
    parser.add_argument("--lr-step-size", type=int, default=defaults["lr_step_size"].default,
                        help="epochs between learning-rate decays (step schedule)")
    parser.add_argument("--lr-gamma", type=float, default=defaults["lr_gamma"].default,
                        help="learning-rate decay factor (step schedule)")
    parser.add_argument("--seed", type=int, default=defaults["seed"].default)
    parser.add_argument("--checkpoint-every", type=int, default=defaults["checkpoint_every"].default,
                        help="epochs between checkpoints")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if present")
    parser.add_argument("--data-root", default=None, help="folder of CIFAR-10 / ImageNet (default: $ARQ_DATA)")
    parser.add_argument("--num-workers", type=int, default=defaults["num_workers"].default)
    parser.add_argument("--device", default=defaults["device"].default, help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--max-test-samples", type=int, default=None)
    parser.add_argument("--test-every", type=int, default=defaults["test_every"].default,
                        help="also measure test accuracy every N epochs (0: only at the end)")
    parser.add_argument("--name", default=None, help="final model file name (default <dataset>-<arch>-sigma<sigma>)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")


def run(args: argparse.Namespace) -> int:
    from arq.train import TrainConfig, train

    try:
        config = TrainConfig(
            dataset=args.dataset, arch=args.arch, sigma=args.sigma, out=args.out, epochs=args.epochs,
            batch_size=args.batch_size, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
            lr_schedule=args.lr_schedule, lr_step_size=args.lr_step_size, lr_gamma=args.lr_gamma,
            seed=args.seed, checkpoint_every=args.checkpoint_every, resume=args.resume,
            data_root=args.data_root, num_workers=args.num_workers, device=args.device,
            max_train_samples=args.max_train_samples, max_test_samples=args.max_test_samples,
            test_every=args.test_every, name=args.name, num_threads=args.threads,
        )
        summary = train(config)
    except (ValueError, FileNotFoundError) as error:
        print(f"arq train: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m arq.cli.train ...``) until ``arq`` dispatches here."""
    parser = argparse.ArgumentParser(prog="arq train")
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
