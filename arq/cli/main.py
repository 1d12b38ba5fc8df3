"""The ``arq`` console script: ``arq <command> [options]``.

Sub-commands live in ``arq.cli.<command>`` and each exposes ``add_parser(subparsers)``
and ``run(args) -> int``. They are imported only when needed: ``arq certify ...``
imports ``arq.cli.certify`` alone, ``arq --help`` imports them all to list them. A
module that is not there (not written yet, or left out of a build) just means that
sub-command is absent.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType
from typing import Sequence

from arq.cli.common import CommandError

SUBCOMMANDS = ("certify", "predict", "analyze", "train", "zoo", "quantize", "search", "compare", "demo")

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def load_subcommand(name: str) -> ModuleType | None:
    """``arq.cli.<name>``, or None if that module does not exist."""
    module_name = f"arq.cli.{name}"
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name == module_name:
            return None
        raise


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``arq`` parser with every available sub-command (or only ``only``)."""
    parser = argparse.ArgumentParser(
        prog="arq",
        description="Randomized-smoothing certification (Cohen et al. 2019) for quantized networks.",
    )
    from importlib.metadata import PackageNotFoundError, version

    try:
        parser.add_argument("--version", action="version", version=f"arq {version('arq')}")
    except PackageNotFoundError:  # running from a source tree that is not installed: no --version
        pass
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        if only is not None and name != only:
            continue
        module = load_subcommand(name)
        if module is None:
            continue
        module.add_parser(subparsers)
        subparsers.choices[name].set_defaults(run=module.run)
    return parser


def _requested_subcommand(argv: Sequence[str]) -> str | None:
    for argument in argv:
        if not argument.startswith("-"):
            return argument if argument in SUBCOMMANDS else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``arq`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    requested = _requested_subcommand(argv)
    if requested is not None and load_subcommand(requested) is None:
        requested = None  # absent sub-command: the full parser reports it among the valid ones
    parser = build_parser(only=requested)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # --help, --version, usage errors
        code = exit_request.code
        return code if isinstance(code, int) else (0 if code is None else EXIT_USER_ERROR)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USER_ERROR
    try:
        return int(args.run(args) or 0)
    except CommandError as error:
        print(f"arq {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except FileNotFoundError as error:
        print(f"arq {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        kept = _KEPT_ON_INTERRUPT.get(args.command)
        print(f"arq {args.command}: interrupted" + (f"; {kept} (continue with --resume)" if kept else ""),
              file=sys.stderr)
        return EXIT_INTERRUPTED


#: What an interrupted command leaves for --resume (commands not named leave nothing to continue).
_KEPT_ON_INTERRUPT = {
    "certify": "the rows written so far are complete",
    "predict": "the rows written so far are complete",
    "compare": "the rows and search episodes written so far are complete",
    "search": "the episodes logged so far are complete",
    "train": "its last checkpoint is complete",
}


if __name__ == "__main__":
    sys.exit(main())
