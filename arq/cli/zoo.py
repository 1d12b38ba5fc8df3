"""``arq zoo``: list the models shipped with arq, with their noise level and test accuracy."""
from __future__ import annotations

import argparse
import json
import sys


def add_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "zoo",
        help="list the shipped noise-trained models",
        description="List the models shipped in arq/zoo/weights: name, sigma, clean and noisy test "
        "accuracy of the base classifier (noisy: one N(0, sigma^2 I) sample per test image). "
        "Load one with arq.zoo.load(name).",
    )
    _add_arguments(parser)
    parser.set_defaults(run=run)
    return parser


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object per model instead of a table")


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def run(args: argparse.Namespace) -> int:
    from arq import zoo

    entries = []
    for name in zoo.names():
        metadata = zoo.info(name)
        entries.append({
            "name": name,
            "arch": metadata["arch"],
            "dataset": metadata["dataset"],
            "sigma": metadata["sigma"],
            "clean_accuracy": metadata.get("clean_accuracy"),
            "noisy_accuracy": metadata.get("noisy_accuracy"),
            "epochs": metadata.get("epochs"),
        })
    if args.json:
        for entry in entries:
            print(json.dumps(entry))
        return 0
    if not entries:
        print("the zoo is empty", file=sys.stderr)
        return 1
    header = f"{'name':<26} {'sigma':>5} {'clean acc':>9} {'noisy acc':>9}"
    print(header)
    print("-" * len(header))
    for entry in entries:
        print(f"{entry['name']:<26} {entry['sigma']:>5.2f} {_percent(entry['clean_accuracy']):>9} "
              f"{_percent(entry['noisy_accuracy']):>9}")
    print("\nnoisy acc: base classifier on x + N(0, sigma^2 I), one sample per MNIST test image; "
          "load with arq.zoo.load(name)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m arq.cli.zoo``) until ``arq`` dispatches here."""
    parser = argparse.ArgumentParser(prog="arq zoo")
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
