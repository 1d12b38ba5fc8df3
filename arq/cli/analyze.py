"""``arq analyze``: certified accuracy table, ACR and plot from certify TSV files.

    arq analyze FILE... [--radii 0:1.5:0.25] [--format md|latex|csv] [--labels L...]
                [--output TABLE] [--plot out.png]

Reads arq's and locuslab/smoothing's certify files. Prints one row per file
(certified accuracy at each radius, then ACR, a wrong or abstained input
counting 0) and, for several files, the envelope: the best of them at each
radius (best over sigma), whose ACR column is the area under that envelope.
"""
from __future__ import annotations

import argparse
import os
import sys

from arq.cli.common import CommandError, HelpFormatter

ENVELOPE_LABEL = "best over files"


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "analyze",
        help="certified accuracy, ACR and plots from certify TSV files",
        description=(
            "Certified accuracy at each radius and ACR (wrong or abstained inputs count 0) of certify TSV "
            "files (arq's or locuslab/smoothing's), with the best-over-files envelope and an optional plot."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="certify TSV (idx label predict radius correct time)")
    parser.add_argument("--radii", default="0:1.5:0.25",
                        help="start:stop:step (stop included) or a comma-separated list")
    parser.add_argument("--format", dest="table_format", choices=("md", "latex", "csv"), default="md",
                        help="table format")
    parser.add_argument("--labels", nargs="+", default=None, metavar="LABEL",
                        help="one name per FILE for the table and legend (default: the file names)")
    parser.add_argument("--output", default=None, help="write the table to this file instead of stdout")
    parser.add_argument("--plot", default=None, metavar="PATH", help="save a certified accuracy plot (png, pdf, svg)")
    parser.add_argument("--title", default=None, help="plot title")
    parser.set_defaults(run=run)
    return parser


def default_labels(paths: list[str]) -> list[str]:
    """File names, or the paths as given where two files share a name."""
    names = [os.path.basename(path) for path in paths]
    if len(set(names)) == len(names):
        return names
    return list(paths)


def run(args: argparse.Namespace) -> int:
    from arq import analyze

    try:
        radii = analyze.parse_radii(args.radii)
    except ValueError as error:
        raise CommandError(f"--radii: {error}") from None
    labels = args.labels if args.labels is not None else default_labels(args.files)
    if len(labels) != len(args.files):
        raise CommandError(f"--labels gives {len(labels)} names for {len(args.files)} files")
    if len(set(labels)) != len(labels):
        raise CommandError(f"--labels must be distinct, got {labels}")
    if args.plot is not None:  # before any work: matplotlib names a format only when saving
        from matplotlib.figure import Figure

        suffix = os.path.splitext(args.plot)[1].lstrip(".").lower()
        formats = Figure().canvas.get_supported_filetypes()
        if suffix not in formats:
            raise CommandError(f"--plot {args.plot}: the file name must end in an image format matplotlib writes "
                               f"({', '.join(sorted(formats))}), got {suffix or 'no suffix'!r}")
    results = {}
    for label, path in zip(labels, args.files):
        if not os.path.isfile(path):
            raise CommandError(f"FILE {path}: no such file")
        try:
            rows = analyze.read_results(path)
        except ValueError as error:
            raise CommandError(str(error)) from None
        if not rows:
            raise CommandError(f"FILE {path} has a header but no rows")
        if rows[0].radius is None:
            raise CommandError(f"FILE {path} has no radius column: analyze reads certify files, not predict files")
        results[label] = rows
    # the envelope compares the files radius by radius: only over the same test images
    try:
        analyze.check_same_images(list(results.values()))
        same_images = True
    except ValueError:
        same_images = False
    if not same_images:
        print(f"arq analyze: warning: the files cover different test images (another --skip/--max, or a run "
              f"still in progress): no {ENVELOPE_LABEL!r} row", file=sys.stderr)
    envelope_label = ENVELOPE_LABEL if same_images else None
    try:
        table = analyze.format_table(results, radii, args.table_format, envelope_label=envelope_label)
    except ValueError as error:  # a file with repeated images
        raise CommandError(str(error)) from None
    if args.output is None:
        sys.stdout.write(table)
    else:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(table)
    if args.plot is not None:
        analyze.plot_certified_accuracy(results, args.plot, radii, envelope_label=envelope_label, title=args.title)
    return 0
