"""``arq certify``: certify the smoothed classifier on a data set, one TSV row per input.

Like locuslab/smoothing's ``certify.py`` (Cohen, Rosenfeld, Kolter, ICML 2019)::

    arq certify DATASET MODEL [SIGMA] OUTFILE [--N0 100] [--N 100000] [--alpha 0.001]
                [--batch 1000] [--skip 1] [--max -1] [--split test]
                [--sigma S] [--seed 0] [--device D] [--backend auto] [--resume]

For each selected input x, CERTIFY picks c_A from n0 noisy samples, lower-bounds
p_A from n more at confidence 1 - alpha, and returns c_A with radius
R = sigma * Phi^-1(p_A lower) (or ABSTAIN = -1, radius 0). The output has the
header ``idx label predict radius correct time`` (time in seconds). The noise
is indexed by the data set index, so a row does not depend on --skip, --max or
--resume.
"""
from __future__ import annotations

import argparse

from arq.cli import common

HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime"


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "certify",
        help="certify a smoothed classifier on a data set (Cohen et al. CERTIFY)",
        description=(
            "Certify a smoothed classifier (Cohen et al. 2019, CERTIFY) on every SKIP-th input of a data set, appending one row per input to OUTFILE: idx label predict radius correct time (seconds)."
        ),
        formatter_class=common.HelpFormatter,
        usage="arq certify [options] DATASET MODEL [SIGMA] OUTFILE",
    )
    common.add_dataset_model_arguments(parser)
    parser.add_argument("--N0", type=common.positive_int, default=100, help="samples that select c_A")
    parser.add_argument("--N", type=common.positive_int, default=100_000, help="samples that estimate p_A")
    common.add_run_arguments(parser)
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from arq.smoothing.core import certify

    prepared = common.prepare_run(args, HEADER, {"N0": args.N0, "N": args.N}, samples_per_input=args.N + args.N0)

    def certify_one(x, label: int, index: int) -> list[str]:
        certificate = certify(
            prepared.model, x, sigma=prepared.sigma, n=args.N, n0=args.N0, alpha=args.alpha,
            batch_size=args.batch, seed=args.seed, num_classes=prepared.num_classes,
            device=prepared.device, backend=args.backend, progress=False, input_index=index,
        )
        prediction = int(certificate.prediction)
        return [str(prediction), repr(float(certificate.radius)), str(int(prediction == label))]

    common.write_rows(prepared.outfile, HEADER, prepared.indices, prepared.dataset, certify_one, "certify")
    return 0
