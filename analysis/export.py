"""Per-sample CSV export of a margin result folder: one row per (subspace, sample).

Columns: sample_index, label, predicted, subspace, margin, converged, iterations, perturbed_label, read with
`margins.store.results.read_report`: `label` is the true label (targets.npy), `predicted` the clean prediction;
columns a folder has no file for (folders of older versions) are written EMPTY; folders of older
frequency_analysis.py versions hold their true labels in labels.npy, which is read instead. Rows are ordered
subspace-major (all samples of subspace 0, then subspace 1, ...).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from common.errors import InputError
from margins.store.results import MarginReport, read_report

COLUMNS = ("sample_index", "label", "predicted", "subspace", "margin", "converged", "iterations", "perturbed_label")
DEFAULT_NAME = "margins_per_sample.csv"
LEGACY_LABELS = "labels.npy"  # true labels in folders of older frequency_analysis.py versions


def read_run(run_dir: Path) -> MarginReport:
    """The folder's report; InputError when it cannot be read."""
    try:
        return read_report(run_dir)
    except (FileNotFoundError, ValueError) as err:
        raise InputError(f"cannot read margin results in {run_dir}: {' '.join(str(err).split())}") from err


def optional_columns(report: MarginReport, run_dir: Path) -> dict[str, np.ndarray | None]:
    """label, predicted, iterations, perturbed_label as [S, N] arrays (None where the folder lacks them)."""
    shape = report.margins.shape
    targets = report.targets
    if targets is None and (run_dir / LEGACY_LABELS).is_file():
        targets = np.load(run_dir / LEGACY_LABELS, allow_pickle=False)
    columns = {
        "label": targets,
        "predicted": report.predicted,
        "iterations": report.iterations,
        "perturbed_label": report.perturbed_labels,
    }
    out = {}
    for name, values in columns.items():
        if values is not None and np.shape(values) not in (shape, shape[1:]):
            raise InputError(f"{run_dir}: {name} has shape {np.shape(values)}, margins {shape}")
        out[name] = None if values is None else np.broadcast_to(values, shape)
    return out


def export_per_sample_csv(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write the per-sample CSV of `run_dir` (default `<run_dir>/margins_per_sample.csv`); returns its path."""
    run_dir = Path(run_dir)
    report = read_run(run_dir)
    margins, converged, indices = report.margins, report.converged, report.indices
    optional = optional_columns(report, run_dir)
    output = Path(output) if output is not None else run_dir / DEFAULT_NAME
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for s in range(margins.shape[0]):
            for n in range(margins.shape[1]):
                extra = {k: "" if v is None else int(v[s, n]) for k, v in optional.items()}
                writer.writerow([int(indices[n]), extra["label"], extra["predicted"], s, repr(float(margins[s, n])),
                                 int(converged[s, n]), extra["iterations"], extra["perturbed_label"]])  # fmt: skip
    return output
