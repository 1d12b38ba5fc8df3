"""``arq predict``: evaluate the smoothed classifier's prediction on a data set, one TSV row per input.

Like locuslab/smoothing's ``predict.py`` (Cohen, Rosenfeld, Kolter, ICML 2019)::

    arq predict DATASET MODEL [SIGMA] OUTFILE [--N 100000] [--alpha 0.001] [--batch 1000]
                [--skip 1] [--max -1] [--split test] [--sigma S] [--seed 0]
                [--device D] [--backend auto] [--resume]

PREDICT counts the base classifier's classes on n noisy samples and returns the
top class c_A unless the two-sided binomial test of n_A out of n_A + n_B at
p = 1/2 has p-value above alpha, in which case it abstains (-1). The output has
the header ``idx label predict correct time`` (time in seconds).
"""
from __future__ import annotations

import argparse

from arq.cli import common

HEADER = "idx\tlabel\tpredict\tcorrect\ttime"


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "predict",
        help="evaluate a smoothed classifier's predictions on a data set (Cohen et al. PREDICT)",
        description=(
            "Evaluate a smoothed classifier's prediction (Cohen et al. 2019, PREDICT) on every SKIP-th input of a data set, appending one row per input to OUTFILE: idx label predict correct time (seconds)."
        ),
        formatter_class=common.HelpFormatter,
        usage="arq predict [options] DATASET MODEL [SIGMA] OUTFILE",
    )
    common.add_dataset_model_arguments(parser)
    parser.add_argument("--N", type=common.positive_int, default=100_000, help="number of noisy samples")
    common.add_run_arguments(parser)
    parser.set_defaults(run=run)
    return parser


def _check_alpha(args: argparse.Namespace, dataset, index: int) -> None:
    """PREDICT tests at alpha - N * delta (:func:`arq.smoothing.core.predict_test_level`): at or below 0
    every row would be an error; refused before OUTFILE is written."""
    from arq.smoothing.core import predict_test_level
    from arq.smoothing.noise import noise_tv_bound

    elements = dataset[index][0].numel()
    try:
        predict_test_level(args.alpha, args.N, elements)
    except ValueError:
        raise common.CommandError(
            f"--alpha {args.alpha:g} is not above N * delta = {args.N * noise_tv_bound(elements):.3g} (the sampler's "
            f"deviation bound for N={args.N} samples of {elements} values): PREDICT could only abstain; raise "
            "--alpha or lower --N") from None


def run(args: argparse.Namespace) -> int:
    from arq.smoothing.core import predict

    prepared = common.prepare_run(args, HEADER, {"N": args.N}, samples_per_input=args.N,
                                  check=lambda dataset, index: _check_alpha(args, dataset, index))

    def predict_one(x, label: int, index: int) -> list[str]:
        result = predict(
            prepared.model, x, sigma=prepared.sigma, n=args.N, alpha=args.alpha,
            batch_size=args.batch, seed=args.seed, num_classes=prepared.num_classes,
            device=prepared.device, backend=args.backend, progress=False, input_index=index,
        )
        prediction = int(getattr(result, "prediction", result))
        return [str(prediction), str(int(prediction == label))]

    common.write_rows(prepared.outfile, HEADER, prepared.indices, prepared.dataset, predict_one, "predict")
    return 0
