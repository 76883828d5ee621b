"""Per-sample CSV export of a margin result folder: one row per (subspace, sample).

Columns: sample_index, label, predicted, subspace, margin, converged, iterations, perturbed_label. The first,
`subspace`, `margin` and `converged` come from the folder's set (read with `read_margin_results`); the others from
optional files written beside it - labels.npy [N] (ground truth), predicted.npy [N] (clean prediction),
iterations.npy [S, N], perturbed_labels.npy [S, N] - and are written EMPTY where the folder lacks the file (older
folders). Rows are ordered subspace-major (all samples of subspace 0, then subspace 1, ...).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from common.errors import InputError
from margins.results import read_margin_results

COLUMNS = ("sample_index", "label", "predicted", "subspace", "margin", "converged", "iterations", "perturbed_label")
OPTIONAL_FILES = {  # column -> (file, per subspace?)
    "label": ("labels.npy", False),
    "predicted": ("predicted.npy", False),
    "iterations": ("iterations.npy", True),
    "perturbed_label": ("perturbed_labels.npy", True),
}
DEFAULT_NAME = "margins_per_sample.csv"


def read_optional(run_dir: Path, shape: tuple[int, int]) -> dict[str, np.ndarray | None]:
    """Optional per-sample arrays broadcast to [S, N] (None where the file is absent); InputError on a bad shape."""
    out = {}
    for column, (name, per_subspace) in OPTIONAL_FILES.items():
        path = run_dir / name
        if not path.is_file():
            out[column] = None
            continue
        values = np.load(path, allow_pickle=False)
        expected = shape if per_subspace else shape[1:]
        if values.shape != expected:
            raise InputError(f"{path} has shape {values.shape}, expected {expected} for margins of shape {shape}")
        out[column] = np.broadcast_to(values, shape)
    return out


def export_per_sample_csv(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write the per-sample CSV of `run_dir` (default `<run_dir>/margins_per_sample.csv`); returns its path."""
    run_dir = Path(run_dir)
    try:
        data = read_margin_results(run_dir)
    except (FileNotFoundError, ValueError) as err:
        raise InputError(f"cannot read margin results in {run_dir}: {' '.join(str(err).split())}") from err
    margins, converged, indices = data["margins"], data["converged"], data["indices"]
    optional = read_optional(run_dir, margins.shape)
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
