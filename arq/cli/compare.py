"""``arq compare``: certify float, uniform (W8A8, W4A4 by default), HAQ-searched and ARQ-searched models.

    arq compare --model mnist-lenet-sigma0.25 --budget 0.015625 --episodes 600 --out results/ \\
                [--images 500] [--n 100000] [--uniform W8A8,W4A4] [--haq-policy P.json] \\
                [--arq-policy P.json] [--resume]

Runs (or, with ``--haq-policy`` / ``--arq-policy``, skips) the two searches at the same
budget, fine-tunes every quantized model the same way, then certifies each with CERTIFY
(Cohen et al. 2019) on a fixed test subset and writes ``compare.md`` / ``compare.csv``
(clean accuracy, certified accuracy at radii, ACR, BitOPs share, search time),
``compare.png`` and one certify TSV per model to ``--out``. Scaled-down runs: ``--images``,
``--n``, ``--episodes`` (and the search options, e.g. ``--search-images``, ``--n-p``).
"""
from __future__ import annotations

import argparse
import os
import re
import sys

from arq.cli import common
from arq.cli.search import add_search_options, default_paths, load_model_and_data, run_one_search, search_config


_UNIFORM = re.compile(r"\s*[Ww]([2-8])[Aa]([2-8])\s*")


def row_labels(text: str) -> tuple[str, ...]:
    """``"float,w8a8,haq"`` -> ``("float", "W8A8", "HAQ")``: rows of the table, as it names them."""
    labels = []
    for item in text.split(","):
        item = item.strip()
        if item.lower() == "float":
            labels.append("float")
        elif item.upper() in ("HAQ", "ARQ") or _UNIFORM.fullmatch(item):
            labels.append(item.upper())
        else:
            raise argparse.ArgumentTypeError(f"expected rows like float,W8A8,HAQ,ARQ, got {item!r}")
    return tuple(labels)


def uniform_policies(text: str) -> tuple[tuple[int, int], ...]:
    """``"W8A8,W4A4"`` -> ``((8, 8), (4, 4))``: the uniform baselines of the table (2-8 bits)."""
    pairs = []
    for item in text.split(","):
        match = _UNIFORM.fullmatch(item)
        if match is None:
            raise argparse.ArgumentTypeError("expected a comma-separated list like W8A8,W4A4 (weight and "
                                             f"activation bits 2-8), got {item.strip()!r}")
        pairs.append((int(match.group(1)), int(match.group(2))))
    if len(set(pairs)) != len(pairs):
        raise argparse.ArgumentTypeError(f"a uniform policy is listed twice in {text!r}")
    return tuple(pairs)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "compare",
        help="certify float, uniform, HAQ and ARQ policies at one BitOPs budget (table + plot)",
        description=(
            "Search HAQ (clean accuracy) and ARQ (certified radius) policies at one BitOPs budget, fine-tune "
            "them and the uniform baselines (--uniform, default W8A8,W4A4) the same way, certify all with the "
            "float model on a fixed test subset, and write a table (compare.md, compare.csv), a plot "
            "(compare.png) and the certify TSVs to --out."
        ),
        formatter_class=common.HelpFormatter,
    )
    parser.add_argument("--model", required=True, help="checkpoint path or arq zoo model name")
    parser.add_argument("--dataset", choices=common.DATASET_NAMES, default=None,
                        help="data set (default: the model's arq_metadata['dataset'])")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--episodes", type=common.positive_int, default=600, help="episodes of each search")
    parser.add_argument("--images", type=common.positive_int, default=500, help="test images certified")
    parser.add_argument("--n", type=common.positive_int, default=100_000, help="CERTIFY's estimation samples")
    parser.add_argument("--n0", type=common.positive_int, default=100, help="CERTIFY's selection samples")
    parser.add_argument("--alpha", type=common.probability, default=0.001, help="CERTIFY's failure probability")
    parser.add_argument("--radii", default="0,0.25,0.5,0.75,1,1.25,1.5", help="radii of the table's columns")
    parser.add_argument("--final-finetune-steps", type=common.non_negative_int, default=200,
                        help="fine-tuning steps of every compared quantized model")
    parser.add_argument("--uniform", type=uniform_policies, default="W8A8,W4A4",
                        help="uniform baselines, e.g. W8A8,W4A4,W3A3 (the one at the budget is the fair peer)")
    parser.add_argument("--haq-policy", default=None, help="use this HAQ policy (JSON) instead of searching")
    parser.add_argument("--arq-policy", default=None, help="use this ARQ policy (JSON) instead of searching")
    parser.add_argument("--resume", action="store_true", help="continue searches and certification in --out")
    parser.add_argument("--only", type=row_labels, default=None,
                        help="certify only these rows, e.g. float,W8A8 or HAQ (run several such processes on one "
                             "--out with --resume, then one without --only to write the table)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_search_options(parser)
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from arq.analyze import parse_radii
    from arq.compare import CompareConfig, check_rows, compare, table_rows
    from arq.quant import Policy
    from arq.search.budget import policy_share

    try:
        radii = parse_radii(args.radii)
        config = CompareConfig(
            images=args.images, n=args.n, n0=args.n0, alpha=args.alpha, batch_size=args.batch, seed=args.seed,
            radii=tuple(radii), finetune_steps=args.final_finetune_steps, finetune_lr=args.finetune_lr,
            finetune_batch_size=args.finetune_batch, train_images=args.train_images,
            calibration_images=min(args.calibration_images, args.train_images), uniform=args.uniform,
        )
    except ValueError as error:
        raise common.CommandError(str(error)) from None
    if args.only is not None:  # before the output folder or any data exist
        try:
            check_rows(args.only, table_rows(args.uniform, ["HAQ", "ARQ"]), name="--only")
        except ValueError as error:
            raise common.CommandError(str(error)) from None
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.resume:
        raise common.CommandError(f"{args.out} is not empty: pass --resume to continue that comparison, or delete it")
    os.makedirs(args.out, exist_ok=True)
    model, train_set, dataset = load_model_and_data(args)
    test_set = common.load_dataset(dataset, "test", args.data_root)

    def searched(reward: str):
        def run_search():
            out = os.path.join(args.out, f"search_{reward}.json")
            paths = default_paths(out)
            search_settings = search_config(args, reward)
            from arq.run_record import weights_sha256
            from arq.search.run import search_fingerprint

            fingerprint = search_fingerprint(args.model, dataset, search_settings, weights_sha256(model))
            resume = args.resume and os.path.isfile(paths["checkpoint"])
            print(f"arq compare: {reward.upper()} search, {args.episodes} episodes", file=sys.stderr)
            result = run_one_search(model, train_set, search_settings, episodes=args.episodes, out=out,
                                    log=paths["log"], checkpoint=paths["checkpoint"], cache_path=paths["cache"],
                                    resume=resume, fingerprint=fingerprint)
            return result.best_policy, result.seconds
        return run_search

    policies = {}
    for label, path, reward in (("HAQ", args.haq_policy, "haq"), ("ARQ", args.arq_policy, "arq")):
        if path is not None:
            try:
                policies[label] = Policy.load(path)
                policies[label].validate(model)
            except (OSError, ValueError) as error:
                raise common.CommandError(f"--{reward}-policy {path}: {error}") from None
            share = policy_share(model, policies[label], tuple(train_set[0][0].shape))
            if share > args.budget * (1 + 1e-9):  # searched rows are held to --budget; a given one is not
                common.warn_user(f"--{reward}-policy {path} costs {share:.6g} of FP32's BitOPs, over --budget "
                                 f"{args.budget:g}: its row is not a comparison at that budget")
        else:
            policies[label] = searched(reward)
    try:
        results = compare(model, train_set, test_set, args.out, config, policies=policies,
                          progress=sys.stderr.isatty(), only=args.only)  # bars only on a terminal
    except ValueError as error:
        raise common.CommandError(str(error)) from None
    if args.only is not None:
        done = ", ".join(f"{row.label} ({len(row.rows)} images)" for row in results)
        print(f"arq compare: certified {done} in {args.out}; once every row is done, rerun without --only "
              "and with --resume to write the table", file=sys.stderr)
        return 0
    with open(os.path.join(args.out, "compare.md"), encoding="utf-8") as handle:
        print(handle.read(), end="")  # the table and the paired differences compare() just wrote
    print(f"arq compare: table in {os.path.join(args.out, 'compare.md')}, plot in "
          f"{os.path.join(args.out, 'compare.png')}", file=sys.stderr)
    return 0
