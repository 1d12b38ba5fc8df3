"""What ``arq certify`` and ``arq predict`` share: options, model and data loading, the TSV runner.

The two sub-commands walk a data set the way locuslab/smoothing's ``certify.py`` and
``predict.py`` do (every ``--skip``-th index, below ``--max``) and append one row per
input to a tab-separated file, flushed and fsync'ed, so that a run killed at any
moment leaves only complete rows plus at most one partial line, which ``--resume``
drops before continuing with the next index.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

DATASET_NAMES = ("mnist", "cifar10", "imagenet")


class CommandError(Exception):
    """A user error: ``arq`` prints the message (no traceback) and exits with status 2."""


def warn_user(message: str) -> None:
    """A one-line warning on stderr (the run goes on)."""
    print(f"arq: warning: {message}", file=sys.stderr)


# --------------------------------------------------------------------------------- options


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` after an option's help, except for None and flags."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or isinstance(action.default, bool) or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def noise_seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2^63), got {text}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def add_dataset_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``DATASET MODEL [SIGMA] OUTFILE`` as locuslab's scripts take them, SIGMA optional."""
    parser.add_argument("dataset", metavar="DATASET", choices=DATASET_NAMES,
                        help=f"data set: {', '.join(DATASET_NAMES)}")
    parser.add_argument("model", metavar="MODEL",
                        help="checkpoint path (arq or locuslab/smoothing format) or arq zoo model name")
    # One list for "[SIGMA] OUTFILE": argparse mishandles an optional positional between two
    # required ones when options are interleaved; split_sigma_and_outfile() sorts them out.
    parser.add_argument("sigma_and_outfile", nargs="+", metavar="[SIGMA] OUTFILE",
                        help="noise level sigma (optional when the model stores it) and the output TSV")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by certify and predict (locuslab's plus arq's)."""
    parser.add_argument("--sigma", type=float, default=None,
                        help="noise level sigma (same as the SIGMA positional)")
    parser.add_argument("--batch", type=positive_int, default=1000, help="noisy samples per forward pass")
    parser.add_argument("--skip", type=positive_int, default=1, help="use every SKIP-th input (index %% SKIP == 0)")
    parser.add_argument("--max", type=int, default=-1,
                        help="use only indices below MAX (-1: no limit), as locuslab's --max")
    parser.add_argument("--split", choices=("train", "test"), default="test", help="train or test split")
    parser.add_argument("--alpha", type=probability, default=0.001, help="failure probability")
    parser.add_argument("--seed", type=noise_seed, default=0, help="noise seed (integer in [0, 2^63))")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "cpp", "cuda", "triton"),
                        help="sampling/vote backend passed to arq (default auto)")
    parser.add_argument("--data-root", default=None,
                        help="folder holding cifar10/imagenet (default: environment variable ARQ_DATA)")
    parser.add_argument("--resume", action="store_true",
                        help="continue OUTFILE after its last complete row instead of refusing to overwrite it")


def split_sigma_and_outfile(values: Sequence[str]) -> tuple[float | None, str]:
    if len(values) == 1:
        try:
            float(values[0])
        except ValueError:
            return None, values[0]
        raise CommandError(f"OUTFILE {values[0]!r} is a number: the output file is missing after SIGMA "
                           f"(DATASET MODEL [SIGMA] OUTFILE; write ./{values[0]} for a file of that name)")
    if len(values) == 2:
        try:
            return float(values[0]), values[1]
        except ValueError:
            raise CommandError(f"SIGMA must be a number, got {values[0]!r}") from None
    raise CommandError(
        f"expected DATASET MODEL [SIGMA] OUTFILE, got {len(values)} arguments after MODEL: {list(values)}"
    )


def resolve_sigma(positional_sigma: float | None, option_sigma: float | None, model_sigma: float | None) -> float:
    """The sigma to use: SIGMA or --sigma (which must agree), else the model's stored sigma.

    Warns when the chosen sigma differs from the sigma stored with the model (certifying at
    another sigma than the model was trained with is legitimate, but usually a slip).
    """
    if positional_sigma is not None and option_sigma is not None and positional_sigma != option_sigma:
        raise CommandError(f"SIGMA {positional_sigma} and --sigma {option_sigma} disagree; give one of them")
    sigma = positional_sigma if positional_sigma is not None else option_sigma
    if sigma is None:
        if model_sigma is None:
            raise CommandError("the model stores no sigma: give SIGMA (or --sigma)")
        sigma = float(model_sigma)
    elif model_sigma is not None and not math.isclose(sigma, float(model_sigma), rel_tol=1e-9, abs_tol=0.0):
        warn_user(f"sigma {sigma} differs from the sigma {model_sigma} the model was trained with")
    if not (sigma > 0 and math.isfinite(sigma)):
        raise CommandError(f"sigma must be a positive number, got {sigma}")
    return sigma


def check_max(maximum: int) -> None:
    if maximum < -1:
        raise CommandError(f"--max must be -1 (no limit) or a non-negative index bound, got {maximum}")


# -------------------------------------------------------------------------- model and data


def _is_quantized_model_file(path: str) -> bool:
    """A safetensors file whose header says ``arq_quant_format`` (arq.quant.save's format)."""
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            return "arq_quant_format" in (handle.metadata() or {})
    except Exception:  # not safetensors (a torch.save checkpoint, say): the checkpoint loader decides
        return False


def load_model(spec: str):
    """An ``nn.Module`` from a checkpoint path (arq, locuslab/smoothing, or a quantized model written
    by ``arq.quant.save`` / ``arq quantize``) or an arq zoo name.

    The tests replace this function (it is the one place that knows where models come from).
    """
    if os.path.isfile(os.path.expanduser(spec)):
        path = os.path.expanduser(spec)
        if _is_quantized_model_file(path):  # written by arq.quant.save / arq quantize
            from arq.quant import load as load_quantized

            try:
                return load_quantized(path)
            except (OSError, ValueError) as error:
                raise CommandError(f"MODEL {spec}: {error}") from None
        try:
            from arq.models import load_checkpoint
        except ImportError as error:
            raise CommandError(f"MODEL {spec}: cannot read checkpoints, arq.models is unavailable ({error})") from None
        try:
            return load_checkpoint(os.path.expanduser(spec))
        except ValueError as error:  # arq.models.CheckpointError: corrupt or unknown checkpoint
            raise CommandError(f"MODEL {spec}: {error}") from None
    try:
        from arq.zoo import load as load_zoo_model
        from arq.zoo import names as zoo_names
    except ImportError:
        raise CommandError(f"MODEL {spec!r}: no such checkpoint file") from None
    names = list(zoo_names())
    if spec not in names:
        raise CommandError(
            f"MODEL {spec!r} is neither a checkpoint file nor a zoo model (zoo models: {', '.join(names) or 'none'})"
        )
    try:
        return load_zoo_model(spec)
    except ValueError as error:  # a changed zoo file (sha256) or one that does not load
        raise CommandError(f"MODEL {spec}: {error}") from None


def load_dataset(name: str, split: str, root: str | None):
    """``arq.data.get_dataset`` without augmentation, whatever the split: a row certified, a
    calibration or search image is the same image at every access and in every run (``arq train``
    reads its data itself, augmented). The tests replace this function with a tiny data set."""
    from arq.data import get_dataset

    return get_dataset(name, split, root, augment=False)


def model_metadata(model) -> dict:
    metadata = getattr(model, "arq_metadata", None)
    return dict(metadata) if isinstance(metadata, dict) else {}


def choose_device(requested: str | None):
    import torch

    if requested is not None:
        try:
            return torch.device(requested)
        except (RuntimeError, ValueError):
            raise CommandError(f"--device {requested!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------ the TSV runner


def selected_indices(dataset_length: int, skip: int, maximum: int) -> range:
    """Data set indices i with i % skip == 0 and i < maximum (maximum -1: all), in order.

    locuslab's loop (``if i % skip: continue; if i == max: break``) gives the same indices
    when ``max`` is a multiple of ``skip``; for other values it never stops, which this fixes.
    """
    stop = dataset_length if maximum < 0 else min(dataset_length, maximum)
    return range(0, stop, skip)


@dataclass
class ExistingRows:
    """What ``--resume`` found in the output file."""

    indices: list[int]
    complete_length: int  # bytes up to and including the last newline
    partial_line: str  # what follows the last newline (a row cut by a crash), usually ""


def _read_existing_rows(path: str, header: str) -> ExistingRows:
    """Check the header and the rows up to the last newline (the file is not modified)."""
    with open(path, "rb") as handle:
        content = handle.read()
    complete_length = content.rfind(b"\n") + 1
    partial_line = content[complete_length:].decode("utf-8", "replace")
    try:
        lines = content[:complete_length].decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise CommandError(f"{path} is not a text file; it was not written by this command") from None
    if not lines:
        return ExistingRows([], complete_length, partial_line)
    if lines[0] != header:
        raise CommandError(
            f"{path}: its header {lines[0]!r} is not {header!r}; it was not written by this command"
        )
    indices = []
    columns = header.count("\t") + 1
    for line_number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != columns:
            raise CommandError(f"{path}:{line_number}: {len(fields)} fields where the header has {columns}")
        try:
            indices.append(int(fields[0]))
        except ValueError:
            raise CommandError(f"{path}:{line_number}: idx {fields[0]!r} is not an integer") from None
    return ExistingRows(indices, complete_length, partial_line)


def _truncate(path: str, length: int) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(length)
        handle.flush()
        os.fsync(handle.fileno())


def _is_non_empty_file(path: str) -> bool:
    return os.path.isfile(path) and os.path.getsize(path) > 0


def _holds_only_a_header(path: str) -> bool:
    """A result file with its header line and no row (a run that failed before its first row)."""
    if os.path.getsize(path) > 4096:
        return False
    with open(path, "rb") as handle:
        lines = handle.read().splitlines()
    return len(lines) == 1 and lines[0].split(b"\t")[0] == b"idx"


def refuse_to_overwrite(path: str, resume: bool) -> None:
    if os.path.isdir(path):
        raise CommandError(f"OUTFILE {path} is a directory")
    if _is_non_empty_file(path) and not resume and not _holds_only_a_header(path):
        raise CommandError(f"{path} exists and is not empty: pass --resume to continue it, or delete it")


def remaining_indices(path: str, header: str, indices: range, resume: bool, record: dict | None = None) -> list[int]:
    """Prepare ``path`` for appending and return the indices still to do.

    Without ``resume`` an existing non-empty file is an error. With it, the rows present must
    be exactly the first rows of ``indices`` (same --skip/--max, or a larger --max) and, given
    a run ``record``, have been made with the same settings (:func:`check_run_record`); an
    incomplete last line is then cut off, and the indices after the last row are returned.
    """
    refuse_to_overwrite(path, resume)
    if not _is_non_empty_file(path):
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        if record is not None:
            check_run_record(path, record, has_rows=False)
        return list(indices)
    existing = _read_existing_rows(path, header)
    if record is not None:
        check_run_record(path, record, has_rows=bool(existing.indices))
    done = len(existing.indices)
    expected = list(indices[:done])
    if existing.indices != expected:
        raise CommandError(
            f"{path} holds rows for indices {_abbreviate(existing.indices)}, but this --skip/--max "
            f"begins with {_abbreviate(expected)}: resume with the options of the first run"
        )
    if existing.partial_line:
        _truncate(path, existing.complete_length)
        print(f"arq: dropped the incomplete last line of {path}: {existing.partial_line!r}", file=sys.stderr)
    return list(indices[done:])


def _abbreviate(values: list[int], keep: int = 6) -> str:
    if len(values) <= keep:
        return str(values)
    return "[" + ", ".join(map(str, values[: keep // 2])) + ", ..., " + ", ".join(map(str, values[-keep // 2 :])) + "]"


def progress_bar(total: int, description: str):
    """A tqdm bar on stderr, silent when stderr is not a terminal."""
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="input", file=sys.stderr,
                disable=not sys.stderr.isatty(), dynamic_ncols=True)


def write_rows(
    path: str,
    header: str,
    indices: Sequence[int],
    dataset,
    compute_fields: Callable[[object, int, int], list[str]],
    description: str,
) -> int:
    """For each index: ``compute_fields(x, label, index)``, then append the row and fsync.

    The row is ``idx label <fields...> time`` with time in seconds (3 decimals). Returns the
    number of rows written.
    """
    written = 0
    with open(path, "a", encoding="utf-8", newline="\n") as output:
        if output.tell() == 0:
            output.write(header + "\n")
            output.flush()
            os.fsync(output.fileno())
        with progress_bar(len(indices), description) as bar:
            for index in indices:
                x, label = dataset[index]
                label = int(label)
                started = time.perf_counter()
                fields = compute_fields(x, label, index)
                elapsed = time.perf_counter() - started
                output.write("\t".join([str(index), str(label), *fields, f"{elapsed:.3f}"]) + "\n")
                output.flush()
                os.fsync(output.fileno())
                written += 1
                bar.update(1)
    return written


# ------------------------------------------------------------------------------ run record


def check_run_record(outfile: str, record: dict, has_rows: bool) -> None:
    """Refuse to resume ``outfile`` under settings that change its rows (:mod:`arq.run_record`): the
    model weights, data set and split, sigma, sample counts, alpha, seed and the model's execution."""
    from arq.run_record import RunRecordMismatch, check_run_record as check

    try:
        check(outfile, record, has_rows, warn=warn_user)
    except RunRecordMismatch as error:
        raise CommandError(str(error)) from None


@dataclass
class PreparedRun:
    """Everything certify and predict need before the loop."""

    model: object
    dataset: object
    sigma: float
    num_classes: int | None
    device: object
    outfile: str
    indices: list[int]


def prepare_engine(model, backend: str, device, work: int) -> dict:
    """Let the certification engine see the whole run's work at once; returns what the run record
    keeps of the model's execution (:func:`arq.smoothing.engine.execution_record`).

    ``arq.certify`` is called once per input, and one input's samples alone stay below the
    engine's compile threshold (``arq.smoothing.engine``); preparing the model with the run's
    ``work`` (samples) compiles a quantized model's integer form once when the run is large enough
    to repay it (``ARQ_COMPILE=0`` keeps it eager). A float model is unaffected. The certify calls
    then reuse this prepared model.
    """
    from arq.smoothing.engine import execution_record, prepare_model

    return execution_record(*prepare_model(model, backend, device, work=work))


def check_model_takes_inputs(model, dataset, index: int, device, dataset_name: str) -> None:
    """Run the model once on input ``index`` (clean), before the output file is written: a model
    that does not take the data set's images fails here with its error named, not at the first row."""
    import torch

    from arq.smoothing.core import check_logits

    image = dataset[index][0]
    try:
        with torch.inference_mode():
            logits = model(image.unsqueeze(0).to(device))
    except Exception as error:  # any failure of the user's model on this data
        raise CommandError(f"the model does not take {dataset_name}'s images (shape {tuple(image.shape)}): "
                           f"{type(error).__name__}: {error}") from None
    try:
        check_logits(logits, 1)
    except (TypeError, ValueError) as error:
        raise CommandError(f"on {dataset_name}'s images: {error}") from None


def prepare_run(args: argparse.Namespace, header: str, settings: dict | None = None,
                samples_per_input: int = 0, check=None) -> PreparedRun:
    """Resolve SIGMA/OUTFILE, load the model and data, prepare the model's execution, and open the
    output for (re)writing.

    ``settings``: the command's own options that its rows depend on (sample counts), kept
    with the shared ones in the run record that ``--resume`` checks (:func:`check_run_record`).
    The record also keeps which model the rows certify (``execution``: a quantized model runs as
    the integer CPU model, the packed GPU kernels or its fake-quant form, and their votes may
    differ slightly; for the integer model also ``conv_kernels``, which differ by CPU and
    ``ARQ_CONV_KERNEL``), so one file never mixes two of them. ``samples_per_input``: the
    engine's work estimate (:func:`prepare_engine`). ``check(dataset, first_index)``: the command's
    own checks, run before OUTFILE is written (raise CommandError).
    """
    positional_sigma, outfile = split_sigma_and_outfile(args.sigma_and_outfile)
    check_max(args.max)
    refuse_to_overwrite(outfile, args.resume)  # before the slow loading
    device = choose_device(args.device)
    model = load_model(args.model)
    metadata = model_metadata(model)
    sigma = resolve_sigma(positional_sigma, args.sigma, metadata.get("sigma"))
    if metadata.get("dataset") not in (None, args.dataset):
        warn_user(f"the model was trained on {metadata['dataset']}, DATASET is {args.dataset}")
    dataset = load_dataset(args.dataset, args.split, args.data_root)
    indices = selected_indices(len(dataset), args.skip, args.max)
    from arq.run_record import weights_sha256

    fingerprint = weights_sha256(model)
    model = model.to(device).eval()
    try:
        from arq.smoothing.noise import resolve_backend

        resolve_backend(args.backend, device)
        execution = prepare_engine(model, args.backend, device, work=len(indices) * samples_per_input)
    except (ValueError, RuntimeError) as error:
        raise CommandError(f"--backend {args.backend}: {error}") from None
    if len(indices):
        check_model_takes_inputs(model, dataset, indices[0], device, args.dataset)
        if check is not None:  # the command's own checks, before OUTFILE is written
            check(dataset, indices[0])
    record = {"command": getattr(args, "command", None), "dataset": args.dataset, "split": args.split,
              "model": fingerprint, "sigma": float(sigma), "alpha": float(args.alpha),
              "seed": int(args.seed), **(settings or {}), **execution}
    todo = remaining_indices(outfile, header, indices, args.resume, record)
    num_classes = metadata.get("num_classes")
    return PreparedRun(model, dataset, sigma, None if num_classes is None else int(num_classes),
                       device, outfile, todo)
