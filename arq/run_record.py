"""Run records: what the rows of a result file depend on, kept beside it as ``FILE.run.json``.

Result files (``arq certify`` / ``arq predict`` TSVs, ``arq compare``'s per-model TSVs) are written
row by row and resumed after their last complete row. A resumed run that changed anything the rows
depend on (model weights, data, sigma, sample counts, alpha, seed, the policy, the model's
execution, ...) would mix two experiments in one file, so :func:`check_run_record` refuses it,
naming what differs. Keys a record written by an older arq lacks are assumed unchanged (with a
warning) and added.
"""
from __future__ import annotations

import json
import os
import sys

RUN_RECORD_SUFFIX = ".run.json"

__all__ = ["RUN_RECORD_SUFFIX", "RunRecordMismatch", "check_run_record", "run_record_path", "weights_sha256"]


def weights_sha256(model) -> str:
    """sha256 over the model's state dict (names, dtypes, shapes and bytes, in key order): the
    record's ``model``, so that a resume with other weights behind the same name is refused."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _canonical(value) -> str:
    """A JSON-able value as the record file holds it (tuples as lists, keys as strings, NaN equal to NaN)."""
    return json.dumps(value, sort_keys=True)


class RunRecordMismatch(ValueError):
    """A resumed run's settings differ from those its file's rows were made with."""


def run_record_path(outfile: str) -> str:
    return outfile + RUN_RECORD_SUFFIX


def check_run_record(outfile: str, record: dict, has_rows: bool, warn=None) -> None:
    """Refuse to resume ``outfile`` under a ``record`` (JSON-able settings) that changes its rows.

    Without rows the record is (re)written. With rows: a differing key raises
    :class:`RunRecordMismatch`; a missing record, or keys the record lacks, are reported through
    ``warn`` (a one-line message; default: stderr) and written, on the assumption that the rows
    were made with these settings.
    """
    warn = warn or (lambda message: print(f"arq: warning: {message}", file=sys.stderr))
    record = json.loads(_canonical(record))  # compared as the file will hold it
    path = run_record_path(outfile)
    if has_rows and os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as handle:
                first = json.load(handle)
        except (OSError, ValueError) as error:
            raise RunRecordMismatch(f"{path}: unreadable run record ({error}); delete it to resume without the check")
        changed = [f"{key} was {first[key]!r}, now {value!r}" for key, value in record.items()
                   if key in first and _canonical(first[key]) != _canonical(value)]
        if changed:
            raise RunRecordMismatch(f"{outfile} was started with other settings ({'; '.join(changed)}): "
                                    "resume with the settings of the first run, or write to a new file")
        missing = [key for key in record if key not in first]
        if not missing:
            return
        warn(f"{os.path.basename(path)} does not record {', '.join(missing)}; resuming on the assumption "
             "that the rows were made with these settings")
        record = {**first, **{key: record[key] for key in missing}}
    elif has_rows:
        warn(f"{outfile} has no run record ({os.path.basename(path)}); resuming on the assumption "
             "that its rows were made with these settings")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=1, sort_keys=True)
        handle.write("\n")
    os.replace(tmp, path)
