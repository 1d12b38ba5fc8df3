"""``arq quantize``: quantize a model to a mixed-precision policy and save it packed.

    arq quantize --model MODEL (--policy policy.json | --uniform W A) --out OUT.safetensors
                 [--dataset NAME] [--split train] [--data-root DIR] [--calibration-size 512]
                 [--finetune-epochs 0] [--finetune-size 0] [--batch 128] [--lr 1e-3]
                 [--momentum 0.9] [--sigma S] [--activation-range mse] [--weight-clip auto]
                 [--seed 0] [--device D]

Folds BatchNorm, calibrates activation ranges on ``--calibration-size`` training inputs
plus Gaussian noise at the model's sigma, optionally fine-tunes under that noise (SGD,
HAQ's defaults), writes OUT (safetensors, packed weights) and OUT's ``.policy.json``, and
prints the BitOPs of the policy as a share of the FP32 model.
"""
from __future__ import annotations

import argparse
import os

from arq.cli import common


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "quantize",
        help="quantize a model to a mixed-precision policy (fake-quant, packed safetensors)",
        description=(
            "Quantize MODEL to per-layer weight/activation bits (a policy JSON or uniform bits): fold "
            "BatchNorm, calibrate on noisy training inputs, optionally fine-tune under Gaussian noise, "
            "and save the packed model (safetensors) and its policy JSON."
        ),
        formatter_class=common.HelpFormatter,
    )
    parser.add_argument("--model", required=True, help="checkpoint file or arq zoo name")
    bits = parser.add_mutually_exclusive_group(required=True)
    bits.add_argument("--policy", help="policy JSON (arq.quant.Policy.save)")
    bits.add_argument("--uniform", type=int, nargs=2, metavar=("W_BITS", "A_BITS"), help="same bits for every layer")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--dataset", help="data set for calibration and fine-tuning (default: the model's)")
    parser.add_argument("--split", default="train", choices=("train", "test"), help="split to draw inputs from")
    parser.add_argument("--data-root", default=None, help="data folder (see arq.data.get_dataset)")
    parser.add_argument("--calibration-size", type=common.positive_int, default=512, help="calibration inputs")
    parser.add_argument("--finetune-epochs", type=common.non_negative_int, default=0, help="0: no fine-tuning")
    parser.add_argument("--finetune-size", type=common.non_negative_int, default=0,
                        help="training inputs for fine-tuning (0: the whole split)")
    parser.add_argument("--batch", type=common.positive_int, default=128, help="fine-tuning batch size")
    parser.add_argument("--lr", type=float, default=1e-3, help="SGD learning rate")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument("--sigma", type=float, default=None, help="noise std (default: the model's sigma)")
    parser.add_argument("--activation-range", default="mse", choices=("minmax", "percentile", "mse"),
                        help="activation range calibration")
    parser.add_argument("--weight-clip", default="auto", choices=("auto", "max", "mse"), help="weight clipping")
    parser.add_argument("--residual-bits", type=int, default=32,
                        help="bits of the residual stream (each residual block's output), 2-8; 32 keeps it float")
    parser.add_argument("--float-shortcuts", action="store_true",
                        help="with --residual-bits < 32, leave the shortcut operands (the first block's input, "
                             "downsampling shortcuts) in float instead of on the stream")
    parser.add_argument("--seed", type=common.non_negative_int, default=0, help="seed of noise and data order")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.set_defaults(run=run)
    return parser


def _stack_inputs(dataset, indices):
    import torch

    inputs, labels = [], []
    for index in indices:
        x, y = dataset[int(index)]
        inputs.append(torch.as_tensor(x, dtype=torch.float32))
        labels.append(int(y))
    return torch.stack(inputs), torch.tensor(labels, dtype=torch.long)


def _prepare_out(path: str) -> None:
    """Refuse an --out that is a folder and create its folder, before any calibration or fine-tuning."""
    if os.path.isdir(path):
        raise common.CommandError(f"--out {path} is a directory; give a .safetensors file name")
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as error:
        raise common.CommandError(f"--out {path}: cannot create its folder {directory}: {error}") from None


def run(args: argparse.Namespace) -> int:
    import torch

    from safetensors import SafetensorError

    import arq.quant as quant
    from arq.quant.modules import QUANT_LAYER_TYPES
    from arq.quant.residual import residual_blocks

    model = common.load_model(args.model)
    if any(isinstance(m, QUANT_LAYER_TYPES) for m in model.modules()):
        raise common.CommandError(
            f"--model {args.model} is already quantized; arq quantize takes a float model (a checkpoint or zoo name)"
        )
    metadata = common.model_metadata(model)
    try:
        policy = (
            quant.Policy.uniform(model, *args.uniform) if args.uniform is not None else quant.Policy.load(args.policy)
        )
        policy.validate(model)
    except (OSError, TypeError, ValueError) as error:
        raise common.CommandError(f"--policy/--uniform: {error}") from None
    sigma = args.sigma if args.sigma is not None else metadata.get("sigma")
    if sigma is None:
        raise common.CommandError("--sigma is required: the model has no arq_metadata['sigma']")
    try:
        config = quant.QuantConfig(
            weight_clip=args.weight_clip, activation_range=args.activation_range,
            calibration_sigma=float(sigma), seed=args.seed, residual_bits=args.residual_bits,
            residual_shortcuts=not args.float_shortcuts,
        )
        finetune = (
            quant.FinetuneConfig(
                epochs=args.finetune_epochs, lr=args.lr, momentum=args.momentum, sigma=float(sigma),
                batch_size=args.batch, seed=args.seed,
            ) if args.finetune_epochs > 0 else None
        )
    except (TypeError, ValueError) as error:
        raise common.CommandError(str(error)) from None
    if args.residual_bits != 32 and not residual_blocks(model):
        raise common.CommandError(
            f"--residual-bits {args.residual_bits}: the model has no residual block (a module returning "
            "add(a, b) or relu(add(a, b)) that torch.fx can trace); leave --residual-bits at 32"
        )
    _prepare_out(args.out)
    dataset_name = args.dataset or metadata.get("dataset")
    if dataset_name is None:
        raise common.CommandError("--dataset is required: the model's metadata names no data set")
    dataset = common.load_dataset(dataset_name, args.split, args.data_root)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))
    calibration, _ = _stack_inputs(dataset, order[: args.calibration_size])
    train_data = None
    if finetune is not None:
        size = args.finetune_size or len(dataset)
        train_data = _stack_inputs(dataset, order[:size])

    device = common.choose_device(args.device)
    model = model.to(device).eval()
    try:
        qmodel = quant.quantize(model, policy, calibration, finetune=finetune, train_data=train_data, config=config)
    except (TypeError, ValueError) as error:
        raise common.CommandError(f"quantize: {error}") from None
    try:
        quant.save(qmodel.cpu(), args.out)
    except (OSError, SafetensorError) as error:  # SafetensorError is not an OSError
        raise common.CommandError(f"--out {args.out}: cannot write it: {error}") from None
    report = quant.bitops(model.cpu(), policy, tuple(calibration.shape[1:]))
    print(
        f"quantized {len(policy)} layers: {report.gbops:.4f} GBOPs per sample, "
        f"{100 * report.fraction_of_fp32:.3f} % of FP32, {report.model_bytes} bytes packed; "
        f"wrote {args.out} and {quant.serialization.policy_sidecar_path(args.out)}"
    )
    return 0
