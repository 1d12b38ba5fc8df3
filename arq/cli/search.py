"""``arq search``: ARQ's mixed-precision search (HAQ's DDPG with a certified-robustness reward).

    arq search --model mnist-lenet-sigma0.25 --budget 0.015625 --reward arq --episodes 600 \\
               --out policy.json [--resume] [--seed 0] [...]

Each episode picks weight and activation bits for every Conv2d/Linear, pushes the policy
under the BitOPs budget (share of FP32; 0.015625 = W4A4), quantizes the model, fine-tunes
it briefly under Gaussian noise and scores it on a held-out subset of the training split:
``--reward arq`` by the ACR of the smoothed model through IRS relative to the float model
(Yang et al. 2024), ``--reward haq`` by clean accuracy (Wang et al. 2019). Writes the best
policy to ``--out`` as it improves, one JSON line per episode to ``--log`` (default
``OUT.jsonl``: policy, BitOPs share, reward, accuracy, ACR, time) and a checkpoint
(default ``OUT.ckpt.pt``) that ``--resume`` continues from.
"""
from __future__ import annotations

import argparse
import os
import sys

from arq.cli import common


def default_paths(out: str) -> dict[str, str]:
    stem = out[:-len(".json")] if out.endswith(".json") else out
    return {"log": stem + ".jsonl", "checkpoint": stem + ".ckpt.pt", "cache": stem + ".irs.pt"}


def non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite non-negative number, got {text}")
    return value


def budget_share(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a BitOPs share of FP32 in (0, 1], got {text}")
    return value


def add_search_options(parser: argparse.ArgumentParser) -> None:
    """The options that define a search (shared with ``arq compare``)."""
    group = parser.add_argument_group("search")
    group.add_argument("--budget", type=budget_share, default=0.015625,
                       help="largest BitOPs share of FP32 (0.015625 = uniform W4A4)")
    group.add_argument("--min-bits", type=int, default=2, help="fewest bits an action maps to")
    group.add_argument("--max-bits", type=int, default=8, help="most bits an action maps to")
    group.add_argument("--seed", type=common.non_negative_int, default=0,
                       help="seeds the agent, the fine-tuning and the noise")
    group.add_argument("--warmup", type=common.non_negative_int, default=20,
                       help="episodes of random actions before DDPG acts (HAQ: 20)")
    group.add_argument("--accuracy-weight", type=non_negative_float, default=0.0,
                       help="weight of clean accuracy in the arq reward")
    data = parser.add_argument_group("reward evaluation (keep it cheap: it runs every episode)")
    data.add_argument("--search-images", type=common.positive_int, default=100,
                      help="held-out images (the last of the training split) the reward is measured on; "
                           "the haq reward (clean accuracy) is cheap and saturates on easy data: give it 1000+")
    data.add_argument("--train-images", type=common.positive_int, default=2000,
                      help="first training images used for the brief fine-tuning")
    data.add_argument("--calibration-images", type=common.positive_int, default=256,
                      help="first training images that calibrate activation ranges")
    data.add_argument("--finetune-steps", type=common.non_negative_int, default=50,
                      help="SGD steps of fine-tuning under noise per candidate (0: calibration only)")
    data.add_argument("--finetune-lr", type=float, default=1e-3, help="fine-tuning learning rate")
    data.add_argument("--finetune-batch", type=common.positive_int, default=128, help="fine-tuning batch size")
    data.add_argument("--search-n", type=common.positive_int, default=10_000,
                      help="samples of the float model's one-off CERTIFY per search image")
    data.add_argument("--search-n0", type=common.positive_int, default=100, help="its selection samples")
    data.add_argument("--n-p", type=common.positive_int, default=1000,
                      help="IRS samples per search image for each candidate (at most --search-n)")
    data.add_argument("--search-alpha", type=common.probability, default=0.001,
                      help="failure probability of the float certificates")
    data.add_argument("--alpha-zeta", type=common.probability, default=0.001,
                      help="failure probability of IRS's disagreement bound")
    data.add_argument("--gamma", type=common.probability, default=0.99,
                      help="IRS certifies directly above this p_A lower bound")
    data.add_argument("--batch", type=common.positive_int, default=1000, help="noisy samples per forward pass")
    data.add_argument("--candidate-execution", choices=("auto", "as-given"), default="auto",
                      help="how each candidate runs in IRS and for its clean accuracy: auto as arq certify runs it "
                           "(on CPU its integer model), "
                           "as-given as its fake-quant model (what searches did before this option: resume those "
                           "with it)")
    data.add_argument("--data-root", default=None, help="folder holding cifar10/imagenet (default: $ARQ_DATA)")


def search_config(args: argparse.Namespace, reward: str):
    """A :class:`arq.search.run.SearchConfig` from the options of :func:`add_search_options`."""
    from arq.search.agent import DDPGConfig
    from arq.search.reward import IRSSettings
    from arq.search.run import SearchConfig

    try:
        return SearchConfig(
            reward=reward, budget=args.budget, min_bits=args.min_bits, max_bits=args.max_bits,
            search_images=args.search_images, train_images=args.train_images,
            calibration_images=min(args.calibration_images, args.train_images),
            finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr,
            finetune_batch_size=args.finetune_batch, accuracy_weight=args.accuracy_weight,
            irs=IRSSettings(n=args.search_n, n0=args.search_n0, n_p=args.n_p, alpha=args.search_alpha,
                            alpha_zeta=args.alpha_zeta, gamma=args.gamma, seed=args.seed, batch_size=args.batch,
                            candidate_execution=args.candidate_execution.replace("-", " ")),
            ddpg=DDPGConfig(warmup_episodes=args.warmup, seed=args.seed),
        )
    except ValueError as error:
        raise common.CommandError(str(error)) from None


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "search",
        help="search per-layer bits under a BitOPs budget (ARQ: HAQ's DDPG, certified-radius reward)",
        description=(
            "Search per-layer weight/activation bits under a BitOPs budget with HAQ's DDPG agent; reward arq "
            "(ACR of the smoothed model through IRS, relative to the float model) or haq (clean accuracy). "
            "Writes the best policy to --out, one JSON line per episode to --log, and a checkpoint for --resume."
        ),
        formatter_class=common.HelpFormatter,
    )
    parser.add_argument("--model", required=True, help="checkpoint path or arq zoo model name")
    parser.add_argument("--dataset", choices=common.DATASET_NAMES, default=None,
                        help="data set (default: the model's arq_metadata['dataset'])")
    parser.add_argument("--reward", choices=("arq", "haq"), default="arq",
                        help="arq: IRS ACR relative to the float model; haq: clean accuracy")
    parser.add_argument("--episodes", type=common.positive_int, default=600, help="episodes in total (HAQ: 600)")
    parser.add_argument("--out", required=True, help="the best policy (JSON), written as it improves")
    parser.add_argument("--log", default=None,
                        help="JSONL, one line per episode (default: OUT with .jsonl for .json, e.g. policy.jsonl)")
    parser.add_argument("--checkpoint", default=None,
                        help="resumable state (default: OUT with .ckpt.pt for .json; the float model's IRS "
                             "certificates go beside it, .irs.pt)")
    parser.add_argument("--resume", action="store_true", help="continue the search of --checkpoint")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_search_options(parser)
    parser.set_defaults(run=run)
    return parser


def load_model_and_data(args: argparse.Namespace):
    """The model (eval mode, on the device) and its training split."""
    device = common.choose_device(args.device)
    model = common.load_model(args.model)
    metadata = common.model_metadata(model)
    dataset = args.dataset or metadata.get("dataset")
    if dataset is None:
        raise common.CommandError("the model stores no data set: give --dataset")
    if metadata.get("sigma") is None:
        raise common.CommandError("the model stores no sigma (arq_metadata['sigma']): search needs a noise-trained "
                                  "arq model")
    train_set = common.load_dataset(dataset, "train", args.data_root)
    return model.to(device).eval(), train_set, dataset


def run_one_search(model, train_set, config, *, episodes: int, out: str, log: str, checkpoint: str, cache_path: str,
                   resume: bool, fingerprint: dict, progress: bool = True):
    """Build the search, reuse or save the float model's IRS cache, run it; returns the SearchResult."""
    from arq.irs import IRSCache
    from arq.search.run import load_checkpoint, make_search, search

    if not resume:
        for path in (log, checkpoint):
            if os.path.exists(path) and os.path.getsize(path) > 0:
                raise common.CommandError(f"{path} exists: pass --resume to continue that search, or delete it")
    checkpoint_state = None
    if resume:  # before the float model's certificates: a resume that cannot go on says so at once
        try:
            checkpoint_state = load_checkpoint(checkpoint, fingerprint)
        except (ValueError, FileNotFoundError) as error:
            raise common.CommandError(str(error)) from None
    for path in (out, log, checkpoint, cache_path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    cache = None
    if resume and os.path.isfile(cache_path):
        try:
            cache = IRSCache.load(cache_path)
        except Exception as error:  # a cut or foreign file: the certificates are rebuilt, not trusted
            common.warn_user(f"{cache_path} is not a readable IRS cache ({error}); certifying the float model again")
    try:
        env, agent = make_search(model, train_set, config, cache=cache)
    except ValueError as error:
        raise common.CommandError(str(error)) from None
    evaluator = env.evaluate
    try:
        reference = evaluator.reference()
    except ValueError as error:
        raise common.CommandError(str(error)) from None
    if evaluator.needs_certificates and cache is None:
        evaluator.float_cache().save(cache_path)
    print(f"arq search: float model on {config.search_images} search images: "
          + ", ".join(f"{k} {v:.4f}" for k, v in reference.items()), file=sys.stderr)

    def report(record: dict) -> None:
        acr = "" if record["acr"] is None else f" acr {record['acr']:.4f}"
        print(f"episode {record['episode']}: bitops {record['bitops_share']:.5f} reward {record['reward']:.4f} "
              f"acc {record['accuracy']:.4f}{acr} ({record['time']:.1f} s)", file=sys.stderr)

    try:
        return search(env, agent, episodes=episodes, log_path=log, best_path=out, checkpoint_path=checkpoint,
                      resume=resume, fingerprint=fingerprint, progress=False, on_episode=report if progress else None,
                      checkpoint_state=checkpoint_state)
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        raise common.CommandError(str(error)) from None


def run(args: argparse.Namespace) -> int:
    paths = default_paths(args.out)
    log = args.log or paths["log"]
    checkpoint = args.checkpoint or paths["checkpoint"]
    config = search_config(args, args.reward)
    model, train_set, dataset = load_model_and_data(args)
    from arq.run_record import weights_sha256
    from arq.search.run import search_fingerprint

    fingerprint = search_fingerprint(args.model, dataset, config, weights_sha256(model))
    result = run_one_search(model, train_set, config, episodes=args.episodes, out=args.out, log=log,
                            checkpoint=checkpoint, cache_path=paths["cache"], resume=args.resume,
                            fingerprint=fingerprint)
    print(f"arq search: best reward {result.best_reward:.4f} at episode {result.best_episode}; policy in {args.out}, "
          f"log in {log} ({result.seconds:.0f} s)", file=sys.stderr)
    return 0
