"""Certified accuracy, Average Certified Radius (ACR), envelopes, tables and plots.

The input is the TSV that ``arq certify`` writes, which is the format of
locuslab/smoothing's ``certify.py`` (Cohen, Rosenfeld, Kolter, ICML 2019)::

    idx  label  predict  radius  correct  time

one row per test input, ``predict == -1`` (ABSTAIN) with ``radius == 0`` when
the smoothed classifier abstains. For a set of N rows:

* certified accuracy at radius r = #{i : correct_i and R_i >= r} / N, the
  fraction of inputs that are classified correctly *and* certified at radius
  at least r (as in locuslab's ``ApproximateAccuracy``);
* ACR (Zhai et al., MACER, ICLR 2020) = (1/N) sum_i R_i [correct_i], a wrong
  or abstained input counting 0. It is also the area under the certified
  accuracy curve: ACR = integral over r >= 0 of certified_accuracy(r) dr;
* the envelope of several runs (typically one per sigma) is, at each radius,
  the best certified accuracy among them (the "best over sigma" curves of
  Cohen et al., Figure 7).

The time column may be seconds (``16.9``) or ``str(datetime.timedelta)``
(``0:02:32.717239``, the format locuslab's script writes).
"""
from __future__ import annotations

import bisect
import csv
import io
import math
import os
import warnings
import re
from typing import Mapping, NamedTuple, Sequence

__all__ = [
    "ResultRow",
    "read_results",
    "parse_time_seconds",
    "parse_radii",
    "certified_accuracy",
    "average_certified_radius",
    "check_same_images",
    "envelope",
    "envelope_area",
    "certified_accuracy_table",
    "format_table",
    "plot_certified_accuracy",
    "TABLE_FORMATS",
]

ABSTAIN = -1
TABLE_FORMATS = ("md", "latex", "csv")
MAX_RADIUS_TICKS = 16  # more radii than this: matplotlib picks the ticks
REQUIRED_COLUMNS = ("idx", "label", "predict", "correct")


class ResultRow(NamedTuple):
    """One row of a certify (or predict) TSV.

    ``radius`` is ``None`` for a predict file (no radius column); ``time`` is
    in seconds, ``None`` when the file has no time column.
    """

    idx: int
    label: int
    predict: int
    radius: float | None
    correct: int
    time: float | None


_TIMEDELTA_PATTERN = re.compile(
    r"^(?:(?P<days>-?\d+) days?, )?(?P<hours>\d+):(?P<minutes>\d{1,2}):(?P<seconds>\d{1,2}(?:\.\d*)?)$"
)


def parse_time_seconds(text: str) -> float:
    """Seconds from ``"16.9"`` or a ``str(datetime.timedelta)`` such as ``"0:02:32.717239"``
    or ``"1 day, 2:03:04.5"``."""
    text = text.strip()
    match = _TIMEDELTA_PATTERN.match(text)
    if match:
        days = int(match.group("days") or 0)
        return (
            days * 86400.0
            + int(match.group("hours")) * 3600.0
            + int(match.group("minutes")) * 60.0
            + float(match.group("seconds"))
        )
    try:
        return float(text)
    except ValueError:
        raise ValueError(
            f"time {text!r} is neither seconds (e.g. 16.9) nor H:MM:SS[.ffffff] (e.g. 0:02:32.717239)"
        ) from None


def read_results(path: str | os.PathLike) -> list[ResultRow]:
    """Read a certify or predict TSV (arq's or locuslab/smoothing's).

    Columns are found by name from the header, so extra columns are ignored
    and the order does not matter. A trailing line without a newline is a run
    killed while writing, or a file written without a final newline: it is read
    when it has all of the header's fields (each field but the last ends at a tab,
    so only the last one could have been cut short) and ignored, with a warning,
    otherwise. Raises ``ValueError`` naming the file and line on a malformed row, and on a row that
    would miscount: a radius that is NaN, infinite or negative, or ``correct`` other than
    ``int(predict == label)``.
    """
    path = os.fspath(path)
    with open(path, "r", encoding="utf-8", newline="") as handle:
        text = handle.read()
    lines = text.split("\n")
    # The last element is "" for a file ending in a newline, else a row without its newline.
    complete_lines = lines[:-1] if len(lines) > 1 else lines
    complete_lines = [line.rstrip("\r") for line in complete_lines]
    last = lines[-1].rstrip("\r") if len(lines) > 1 else ""
    if not complete_lines or not complete_lines[0].strip():
        raise ValueError(f"{path}: empty file, expected a header 'idx label predict radius correct time'")
    header = complete_lines[0].split("\t")
    missing = [name for name in REQUIRED_COLUMNS if name not in header]
    if missing:
        raise ValueError(
            f"{path}: header {header!r} lacks column(s) {missing}; "
            "expected tab-separated 'idx label predict radius correct time'"
        )
    if last.strip():
        if len(last.split("\t")) == len(header):
            complete_lines.append(last)
        else:
            warnings.warn(f"{path}: ignored its last line, cut short without a newline: {last!r}", stacklevel=2)
    column = {name: header.index(name) for name in header}
    radius_column = column.get("radius")
    time_column = column.get("time")

    rows = []
    for line_number, line in enumerate(complete_lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise ValueError(f"{path}:{line_number}: {len(fields)} fields, the header has {len(header)}")
        try:
            rows.append(
                ResultRow(
                    idx=int(fields[column["idx"]]),
                    label=int(fields[column["label"]]),
                    predict=int(fields[column["predict"]]),
                    radius=None if radius_column is None else float(fields[radius_column]),
                    correct=int(fields[column["correct"]]),
                    time=None if time_column is None else parse_time_seconds(fields[time_column]),
                )
            )
        except ValueError as error:
            raise ValueError(f"{path}:{line_number}: {error}") from None
        problem = _row_problem(rows[-1])
        if problem:
            raise ValueError(f"{path}:{line_number}: {problem}")
    return rows


def _row_problem(row: ResultRow) -> str | None:
    """What makes ``row`` unusable for certified accuracy, or None. A NaN radius would make the sorted
    radii meaningless (and ACR NaN), an infinite or negative one is no certificate, and a row whose
    ``correct`` disagrees with ``predict == label`` would count a wrong class as certified."""
    if row.radius is not None and not (math.isfinite(row.radius) and row.radius >= 0):
        return f"radius must be a finite number >= 0, got {row.radius!r} (idx {row.idx})"
    if row.correct not in (0, 1):
        return f"correct must be 0 or 1, got {row.correct!r} (idx {row.idx})"
    if row.correct != int(row.predict == row.label):
        return (f"correct={row.correct} disagrees with predict={row.predict} and label={row.label} "
                f"(idx {row.idx}): correct must be 1 exactly when predict == label")
    return None


#: More radii than a table or plot can show is a typo (0:1e12:1), not a request.
MAX_RADII = 10_000


def parse_radii(text: str) -> list[float]:
    """Radii from ``"start:stop:step"`` (stop included, e.g. ``"0:1.5:0.25"``) or a
    comma-separated list (``"0,0.25,0.5"``)."""
    text = text.strip()
    try:
        if ":" in text:
            parts = [float(part) for part in text.split(":")]
            if len(parts) != 3:
                raise ValueError
            start, stop, step = parts
            if not all(map(math.isfinite, parts)) or step <= 0 or stop < start or start < 0:
                raise ValueError
            count = int(math.floor((stop - start) / step + 1e-9)) + 1
            if count > MAX_RADII:
                raise ValueError
            # round() removes the drift of start + k * step (0.30000000000000004).
            return [round(start + k * step, 12) for k in range(count)]
        radii = [float(part) for part in text.split(",") if part.strip()]
        if not radii or len(radii) > MAX_RADII or any(r < 0 or not math.isfinite(r) for r in radii):
            raise ValueError
        return radii
    except ValueError:
        raise ValueError(
            f"radii {text!r}: expected start:stop:step with finite 0 <= start <= stop and step > 0 "
            f"(e.g. 0:1.5:0.25), or non-negative numbers separated by commas (e.g. 0,0.5,1); at most "
            f"{MAX_RADII} radii"
        ) from None


def _certified_radii(rows: Sequence[ResultRow]) -> list[float]:
    """Per row, the radius if the row is correct (and not abstained), else 0 (not certified)."""
    if not rows:
        raise ValueError("rows is empty: no results to analyze")
    radii = []
    for row in rows:
        if row.radius is None:
            raise ValueError(f"row idx={row.idx} has no radius: is this a predict file rather than a certify file?")
        problem = _row_problem(row)
        if problem:
            raise ValueError(f"rows: {problem}")
        is_certified_correct = row.correct == 1 and row.predict != ABSTAIN
        radii.append(row.radius if is_certified_correct else -math.inf)
    return radii


def certified_accuracy(rows: Sequence[ResultRow], radii: Sequence[float]) -> list[float]:
    """Certified accuracy at each radius r: #{correct and R >= r} / N."""
    certified = sorted(_certified_radii(rows))
    return [_fraction_at_least(certified, r) for r in radii]


def _fraction_at_least(sorted_values: Sequence[float], threshold: float) -> float:
    return (len(sorted_values) - bisect.bisect_left(sorted_values, threshold)) / len(sorted_values)


def average_certified_radius(rows: Sequence[ResultRow]) -> float:
    """ACR = mean over rows of R [correct], wrong or abstained rows counting 0."""
    certified = _certified_radii(rows)
    return sum(max(value, 0.0) for value in certified) / len(certified)


def check_same_images(list_of_results: Sequence[Sequence[ResultRow]]) -> None:
    """The envelope compares the runs' certified fractions radius by radius: only meaningful over
    the same test images (a run still in progress covers fewer)."""
    if not list_of_results:
        raise ValueError("list_of_results is empty: the envelope needs at least one run")
    first = sorted(row.idx for row in list_of_results[0])
    for number, rows in enumerate(list_of_results[1:], start=2):
        if sorted(row.idx for row in rows) != first:
            raise ValueError(f"run {number} covers other test images than run 1 ({len(rows)} against "
                             f"{len(first)} rows): the best-over-runs envelope needs the same images in every run")


def envelope(list_of_results: Sequence[Sequence[ResultRow]], radii: Sequence[float]) -> list[float]:
    """Best certified accuracy over the runs at each radius (max over sigma), runs over the same images."""
    check_same_images(list_of_results)
    curves = [certified_accuracy(rows, radii) for rows in list_of_results]
    return [max(values) for values in zip(*curves)]


def envelope_area(list_of_results: Sequence[Sequence[ResultRow]]) -> float:
    """Area under the exact envelope curve, integral over r >= 0 of max_k acc_k(r) dr.

    Each certified accuracy curve is a step function that only changes at a
    run's radii, so the integral is exact. For one run it equals the ACR; for
    several it is the ACR that a per-radius choice of sigma would reach (an
    upper bound, not the ACR of any single model).
    """
    check_same_images(list_of_results)
    certified_per_run = [sorted(_certified_radii(rows)) for rows in list_of_results]
    breakpoints = sorted({value for run in certified_per_run for value in run if value > 0})
    area, previous = 0.0, 0.0
    for breakpoint in breakpoints:
        # On (previous, breakpoint] every curve is constant: acc_k(breakpoint).
        best = max(_fraction_at_least(run, breakpoint) for run in certified_per_run)
        area += (breakpoint - previous) * best
        previous = breakpoint
    return area


def certified_accuracy_table(
    results: Mapping[str, Sequence[ResultRow]],
    radii: Sequence[float],
    envelope_label: str | None = "best over runs",
) -> tuple[list[str], list[tuple[str, list[float]]]]:
    """Header and rows ``(label, [acc(r) for r in radii] + [ACR])``, plus an envelope row when
    ``envelope_label`` is given, there are at least two runs and they cover the same test images
    (else a warning; its ACR is :func:`envelope_area`). A run with repeated images raises ValueError."""
    if not results:
        raise ValueError("results is empty: give at least one run")
    for label, rows in results.items():
        indices = [row.idx for row in rows]
        if len(set(indices)) != len(indices):
            repeated = sorted({index for index in indices if indices.count(index) > 1})
            raise ValueError(f"run {label!r} has several rows for test image(s) {repeated[:10]}: each would count "
                             "more than once")
    header = ["run"] + [f"r={r:g}" for r in radii] + ["ACR"]
    table = [
        (label, certified_accuracy(rows, radii) + [average_certified_radius(rows)])
        for label, rows in results.items()
    ]
    if envelope_label is not None and len(results) > 1:
        runs = list(results.values())
        try:
            check_same_images(runs)
        except ValueError as error:  # each run's own row still stands
            warnings.warn(f"no {envelope_label!r} row: {error}", stacklevel=2)
        else:
            table.append((envelope_label, envelope(runs, radii) + [envelope_area(runs)]))
    return header, table


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
    "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(character, character) for character in text)


def format_table(
    results: Mapping[str, Sequence[ResultRow]],
    radii: Sequence[float],
    fmt: str = "md",
    envelope_label: str | None = "best over runs",
    decimals: int = 3,
) -> str:
    """Certified accuracy at each radius and ACR, one row per run (plus the envelope).

    ``fmt``: ``"md"`` (Markdown), ``"latex"`` (a ``tabular``) or ``"csv"``
    (full precision). Numbers in md and latex have ``decimals`` decimals.
    """
    if fmt not in TABLE_FORMATS:
        raise ValueError(f"fmt {fmt!r} is not one of {', '.join(TABLE_FORMATS)}")
    header, table = certified_accuracy_table(results, radii, envelope_label)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        for label, values in table:
            writer.writerow([label] + [repr(float(value)) for value in values])
        return buffer.getvalue()
    cells = [[label] + [f"{value:.{decimals}f}" for value in values] for label, values in table]
    if fmt == "md":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
        lines += ["| " + " | ".join([row[0].replace("|", "\\|")] + row[1:]) + " |" for row in cells]
        return "\n".join(lines) + "\n"
    latex_header = [""] + [f"$r = {r:g}$" for r in radii] + ["ACR"]
    lines = [
        r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}",
        r"\hline",
        " & ".join(latex_header) + r" \\",
        r"\hline",
    ]
    lines += [" & ".join([_latex_escape(row[0])] + row[1:]) + r" \\" for row in cells]
    lines += [r"\hline", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def plot_certified_accuracy(
    results: Mapping[str, Sequence[ResultRow]],
    path: str | os.PathLike,
    radii: Sequence[float],
    envelope_label: str | None = "best over runs",
    title: str | None = None,
) -> None:
    """Plot certified accuracy against radius, one curve per run (and the dashed envelope), to ``path``.

    The curves are drawn exactly (steps at the runs' radii) from 0 to
    ``max(radii)``; ``radii`` are the x ticks (up to 16 of them). Drawn with
    matplotlib's Agg canvas, so no display is needed; the format follows
    ``path``'s suffix (png, pdf, svg).
    """
    if not results:
        raise ValueError("results is empty: give at least one run to plot")
    if not radii:
        raise ValueError("radii is empty: give the radii to plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    max_radius = max(radii)
    grid_size = 1001
    grid = [max_radius * k / (grid_size - 1) for k in range(grid_size)]
    figure = Figure(figsize=(6.0, 4.0))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    for label, rows in results.items():
        axes.plot(grid, certified_accuracy(rows, grid), label=label)
    if envelope_label is not None and len(results) > 1:
        try:
            axes.plot(grid, envelope(list(results.values()), grid), "k--", label=envelope_label)
        except ValueError as error:  # runs over other images: each run's curve still stands
            warnings.warn(f"no {envelope_label!r} curve: {error}", stacklevel=2)
    axes.set_xlim(0.0, max_radius if max_radius > 0 else 1.0)
    axes.set_ylim(0.0, 1.0)
    if len(radii) <= MAX_RADIUS_TICKS:
        axes.set_xticks(list(radii))
    axes.set_xlabel("radius (L2)")
    axes.set_ylabel("certified accuracy")
    if title:
        axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(os.fspath(path), dpi=150)
