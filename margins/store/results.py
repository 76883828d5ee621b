"""Margin results on disk: validated arrays, a JSON summary and the paper plot, written atomically.

Layout of `output_dir` (our files only; anything else in the directory is never touched):
    margins.npy    float32 [S, N]  margin of sample n along subspace s (L2, input space)
    converged.npy  bool    [S, N]  DeepFool flipped the label within max_iter
    indices.npy    int64   [N]     dataset indices of the samples (column order)
    iterations.npy int64   [S, N]  DeepFool steps taken (optional: when recorded)
    perturbed_labels.npy int64 [S, N]  predicted label of x + (1 + overshoot) r (optional)
    predicted.npy  int64   [N]     clean predicted labels (optional); targets.npy int64 [N] true labels (optional)
    margins.png    the paper plot (optional)
    summary.json   {"schema_version", "shape", "settings", "stats", "extra", "files"}: the commit marker;
                   "stats" is `summarize(...)` of the stored float32 margins (NaN medians stored as null),
                   "files" maps each file of the set to its SHA-256.

Atomicity: everything (arrays, plot, JSON) is first made in memory, then written and fsynced into a temporary
sibling directory `.<name>.tmp-*` in the same parent, so any failure (bad settings, plotting error, full disk)
leaves `output_dir` untouched and the temporary directory is removed; a full disk (any write, numpy's errno-less
short writes included) is the one-line InputError of `margins.store.disk.disk_full_error`, with the set's exact size.
Commit:
  - `output_dir` absent: the whole temporary directory is renamed into place (one atomic rename).
  - `output_dir` present: each data file is moved in with `os.replace` (atomic per file), then
    `summary.json` LAST. `summary.json` records the SHA-256 of every file of its set, and
    `read_margin_results` verifies them, so a crash between those renames (the only non-atomic window,
    renames on one filesystem) is detected as an inconsistent set instead of being read silently.
    Stale optional files (figure, iterations, labels) of a previous set are removed after the commit.

Schema: `MarginReport` (schema_version 3) written by `write_report` (the one writer of every command) and read by
`read_report`; folders written by earlier versions still read: schema 2 named the block side `subspace_block` and
each subspace's dimension `subspace_dims` (now `subspace_dim`, the flag's name, and `subspace_size`); schema 1
(summary.json with `format_version` 1) had no optional arrays.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import io
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from margins.store.disk import disk_full, disk_full_error
from margins.store.names import estimator_of

SCHEMA_VERSION = 3
RENAMED_SETTINGS = {"subspace_block": "subspace_dim", "subspace_dims": "subspace_size"}  # schema <= 2 -> 3
MARGINS_FILE = "margins.npy"
CONVERGED_FILE = "converged.npy"
INDICES_FILE = "indices.npy"
FIGURE_FILE = "margins.png"
SUMMARY_FILE = "summary.json"
RESULT_FILES = (MARGINS_FILE, CONVERGED_FILE, INDICES_FILE, FIGURE_FILE, SUMMARY_FILE)
OPTIONAL_ARRAYS = {  # field -> (file, dtype, "grid" [S, N] or "samples" [N])
    "iterations": ("iterations.npy", np.int64, "grid"),
    "perturbed_labels": ("perturbed_labels.npy", np.int64, "grid"),
    "predicted": ("predicted.npy", np.int64, "samples"),
    "targets": ("targets.npy", np.int64, "samples"),
}
OPTIONAL_FILES = (FIGURE_FILE, *(name for name, _, _ in OPTIONAL_ARRAYS.values()))


@dataclasses.dataclass
class MarginReport:
    """One margin measurement: the typed result schema (`schema_version` 3) of the CLI and the callback.

    margins: float32 [S, N] (subspace s low -> high frequency, sample n); converged: bool [S, N];
    indices: int64 [N] dataset indices; iterations / perturbed_labels: int64 [S, N] or None;
    predicted / targets: int64 [N] clean predicted and true labels, or None; settings: what produced the run;
    extra: anything else (clean accuracy, seconds, ...); stats: `summarize(margins, converged)` (filled on write).
    """

    margins: np.ndarray
    converged: np.ndarray
    indices: np.ndarray
    settings: dict
    iterations: np.ndarray | None = None
    perturbed_labels: np.ndarray | None = None
    predicted: np.ndarray | None = None
    targets: np.ndarray | None = None
    extra: dict = dataclasses.field(default_factory=dict)
    stats: dict = dataclasses.field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION


def summarize(margins: np.ndarray, converged: np.ndarray) -> dict:
    """Summary statistics of `margins: [S, N]` with `converged: [S, N]` bool.

    Returns a dict of plain Python values:
        num_subspaces, num_samples: S, N.
        median_margin: [S] median over the CONVERGED samples of each subspace only (NaN where none converged).
            A non-converged margin is just the perturbation accumulated in max_iter steps, not a margin.
        median_margin_all: [S] median over ALL N samples, converged or not; this is what the original
            release reports and plots (it keeps non-converged samples silently), so use it to compare.
        num_not_converged: [S] count of non-converged samples per subspace; num_not_converged_total: their sum.
    Medians are computed in float64 from the given values.
    """
    margins, converged = _check_margins(margins, converged)
    values = margins.astype(np.float64)
    median_conv = [float(np.median(row[ok])) if ok.any() else math.nan for row, ok in zip(values, converged)]
    missed = (~converged).sum(axis=1)
    return {
        "num_subspaces": int(margins.shape[0]),
        "num_samples": int(margins.shape[1]),
        "median_margin": median_conv,
        "median_margin_all": [float(v) for v in np.median(values, axis=1)],
        "num_not_converged": [int(v) for v in missed],
        "num_not_converged_total": int(missed.sum()),
    }


def time_line(*reports: MarginReport) -> str:
    """The `time:` line every margin command prints: engine seconds summed over every run into the result folders
    (a resumed folder counts its earlier runs too) and wall seconds of this run."""
    engine = sum(r.extra["engine_seconds"] for r in reports)
    seconds = sum(r.extra["seconds"] for r in reports)
    folders = "this folder" if len(reports) == 1 else "these folders"
    s = reports[0].settings
    return (
        f"time: {engine:.1f} s in the engine over all runs into {folders} "
        f"({seconds:.1f} s this run, {s['device_type']}, {s['dtype']})"
    )


def write_report(output_dir: str | Path, report: MarginReport, figure: bool = True, title: str = "") -> Path:
    """Validate `report` and write it atomically to `output_dir` (module docstring); returns `output_dir`.

    All validation, JSON conversion and drawing happen before anything is written; `report.stats` is recomputed
    from the stored float32 margins. A full disk: InputError naming the folder and the set's size.
    """
    output_dir = Path(output_dir)
    contents = _set_contents(report, figure, title)
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"output_dir {output_dir} exists and is not a directory; choose another path")
    tmp = output_dir.parent / f".{output_dir.name}.tmp-{uuid.uuid4().hex}"
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp_dirs(output_dir)
        tmp.mkdir()  # default permissions (umask), unlike tempfile.mkdtemp's 0700: it may become output_dir
        for name, data in contents.items():
            _write_file(tmp / name, data)
        _commit(tmp, output_dir, list(contents))
    except OSError as err:
        if disk_full(err):
            raise disk_full_error(output_dir, sum(len(data) for data in contents.values())) from err
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output_dir


def report_bytes(num_subspaces: int, num_samples: int, settings: Mapping, figure: bool = True) -> int:
    """About the bytes `write_report` writes for an `[S, N]` report with `settings`: the arrays exactly,
    summary.json and the figure as made for placeholder margins of that shape (their sizes depend little on the
    values)."""
    shape = (num_subspaces, num_samples)
    zeros = np.zeros(shape, np.int64)
    placeholder = MarginReport(
        margins=np.random.default_rng(0).gamma(2.0, 1.0, shape).astype(np.float32),
        converged=np.ones(shape, bool),
        indices=np.arange(num_samples),
        settings=dict(settings),
        iterations=zeros,
        perturbed_labels=zeros,
        predicted=zeros[0],
        targets=zeros[0],
    )
    return sum(len(data) for data in _set_contents(placeholder, figure, "").values())


def _set_contents(report: MarginReport, figure: bool, title: str) -> dict[str, bytes]:
    """Validate `report`; every file of its set as bytes, summary.json last (it records the others' SHA-256)."""
    margins, converged = _check_margins(np.asarray(report.margins), np.asarray(report.converged))
    margins = margins.astype(np.float32)
    indices = _check_indices(np.asarray(report.indices), margins.shape[1])
    if not isinstance(report.settings, Mapping):
        raise TypeError(f"settings must be a dict of the run's configuration, got {type(report.settings).__name__}")
    arrays = {MARGINS_FILE: margins, CONVERGED_FILE: converged, INDICES_FILE: indices}
    arrays.update(_optional_arrays(report, margins.shape))
    payload = {
        "schema_version": SCHEMA_VERSION,
        "shape": list(margins.shape),
        "settings": json_safe(dict(report.settings), "settings"),
        "stats": json_safe(summarize(margins, converged), "stats"),
        "extra": json_safe(dict(report.extra), "extra"),
    }
    contents = {name: _npy_bytes(array) for name, array in arrays.items()}
    if figure:
        from plotting.margins import plot_margins  # matplotlib only when a figure is drawn

        drawing = io.BytesIO()
        plot_margins(**_figure_arguments(report, margins, converged, title)).savefig(drawing, format="png", dpi=150)
        contents[FIGURE_FILE] = drawing.getvalue()
    payload["files"] = {name: hashlib.sha256(data).hexdigest() for name, data in contents.items()}
    contents[SUMMARY_FILE] = (json.dumps(payload, indent=2, allow_nan=False) + "\n").encode()
    return contents


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _optional_arrays(report: MarginReport, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    out = {}
    for key, (name, dtype, kind) in OPTIONAL_ARRAYS.items():
        value = getattr(report, key)
        if value is None:
            continue
        value = _to_numpy(value, key) if isinstance(value, torch.Tensor) else np.asarray(value)
        want = shape if kind == "grid" else (shape[1],)
        if value.shape != want:
            raise ValueError(f"{key} must have shape {list(want)} like the margins, got {list(value.shape)}")
        out[name] = value.astype(dtype)
    return out


def remove_stale_tmp_dirs(output_dir: Path, older_than: float = 3600.0) -> list[Path]:
    """Remove `.<name>.tmp-*` siblings of `output_dir` left by killed writers (older than `older_than` s)."""
    removed = []
    if not output_dir.parent.is_dir():
        return removed
    now = time.time()
    for path in output_dir.parent.glob(f".{output_dir.name}.tmp-*"):
        try:
            if now - path.stat().st_mtime > older_than:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        except FileNotFoundError:
            continue
    return removed


def read_report(output_dir: str | Path) -> MarginReport:
    """Read a set written by `write_report` (or by `write_margin_results` of schema 1) into a `MarginReport`.

    Raises FileNotFoundError when no committed set exists and ValueError when a file does not match the checksum
    recorded in summary.json (interrupted write) or the schema is newer than this code.
    """
    output_dir = Path(output_dir)
    summary = _read_summary(output_dir)
    version = summary.get("schema_version", summary.get("format_version", 1))
    if version > SCHEMA_VERSION:
        raise ValueError(f"{output_dir} was written by a newer version (schema {version} > {SCHEMA_VERSION})")
    files = summary.get("files", {})
    optional = {
        key: np.load(output_dir / name, allow_pickle=False) if name in files else None
        for key, (name, _, _) in OPTIONAL_ARRAYS.items()
    }
    return MarginReport(
        margins=np.load(output_dir / MARGINS_FILE, allow_pickle=False),
        converged=np.load(output_dir / CONVERGED_FILE, allow_pickle=False),
        indices=np.load(output_dir / INDICES_FILE, allow_pickle=False),
        settings=_current_names(summary.get("settings", {}), version),
        extra=summary.get("extra", {}),
        stats=summary.get("stats", {}),
        schema_version=int(version),
        **optional,
    )


def _current_names(settings: dict, version: int) -> dict:
    """`settings` of a folder of schema `version` under this schema's names (`RENAMED_SETTINGS`)."""
    if version >= 3:
        return settings
    return {RENAMED_SETTINGS.get(key, key): value for key, value in settings.items()}


def _read_summary(output_dir: Path) -> dict:
    summary_path = output_dir / SUMMARY_FILE
    if not summary_path.is_file():
        raise FileNotFoundError(f"no margin results in {output_dir}: {SUMMARY_FILE} is missing (run not finished?)")
    summary = json.loads(summary_path.read_text())
    for name, digest in summary.get("files", {}).items():
        path = output_dir / name
        if not path.is_file() or _sha256(path) != digest:
            raise ValueError(
                f"margin results in {output_dir} are inconsistent: {name} is missing or does not match "
                f"{SUMMARY_FILE} (an interrupted write?); rerun the measurement to rewrite them"
            )
    return summary


def _figure_arguments(report: MarginReport, margins: np.ndarray, converged: np.ndarray, title: str) -> dict:
    """`plot_margins` arguments: misclassified samples marked when the labels are known; the title names the run
    (default: model, dataset and transform of `report.settings`) and the estimator, the subtitle the sample and
    subspace counts; random subspaces get an axis without frequency order."""
    from plotting.margins import describe_settings

    known = report.predicted is not None and report.targets is not None
    wrong = np.asarray(report.predicted) != np.asarray(report.targets) if known else None
    title = title or describe_settings(report.settings)
    return {"margins": margins, "converged": converged, "title": title, "misclassified": wrong,
            "estimator": estimator_of(report.settings), "family": report.settings.get("subspace")}  # fmt: skip


def _commit(tmp: Path, output_dir: Path, files: list[str]) -> None:
    """Move the set from `tmp` into `output_dir`: one directory rename if absent, else per file, summary last."""
    if not output_dir.exists():
        try:
            os.replace(tmp, output_dir)
            return
        except OSError:  # created concurrently: fall back to per-file moves
            output_dir.mkdir(parents=True, exist_ok=True)
    for name in files:  # summary.json is the last entry: the commit marker
        os.replace(tmp / name, output_dir / name)
    for name in OPTIONAL_FILES:
        if name not in files:
            (output_dir / name).unlink(missing_ok=True)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _to_numpy(value: Any, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(value).__name__}")


def _check_margins(margins: np.ndarray, converged: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    margins, converged = np.asarray(margins), np.asarray(converged)
    if margins.ndim != 2 or margins.size == 0:
        raise ValueError(f"margins must be a non-empty [S, N] array (subspaces x samples), got shape {margins.shape}")
    if not np.issubdtype(margins.dtype, np.floating):
        raise ValueError(f"margins must be floating point, got dtype {margins.dtype}")
    if converged.shape != margins.shape:
        raise ValueError(f"converged has shape {converged.shape} but margins has {margins.shape}; they must match")
    if converged.dtype != np.bool_:
        raise ValueError(f"converged must be a bool array, got dtype {converged.dtype}; pass result.converged")
    bad = ~np.isfinite(margins)
    if bad.any():
        s, n = np.argwhere(bad)[0]
        raise ValueError(
            f"margins contain {int(bad.sum())} NaN/infinite values (first at subspace {s}, sample {n}); "
            "nothing was written: check the model and the attack"
        )
    if (margins < 0).any():
        raise ValueError("margins must be non-negative (they are L2 norms)")
    return margins, converged


def _check_indices(indices: np.ndarray, num_samples: int) -> np.ndarray:
    if indices.ndim != 1 or indices.shape[0] != num_samples:
        raise ValueError(f"indices must have shape [N] = [{num_samples}] (one per margin column), got {indices.shape}")
    if not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"indices must be integer dataset indices, got dtype {indices.dtype}")
    if (indices < 0).any():
        raise ValueError("indices must be non-negative dataset indices")
    return indices.astype(np.int64)


def json_safe(value: Any, key: str) -> Any:
    """Recursively convert to JSON-safe values; `key` names the location for error messages."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.generic):
        return json_safe(value.item(), key)
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return json_safe(_to_numpy(value, key).tolist(), key)
    if isinstance(value, (Path, torch.device, torch.dtype)):
        return str(value)
    if isinstance(value, enum.Enum):
        return json_safe(value.value, key)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return json_safe(dataclasses.asdict(value), key)
    if isinstance(value, Mapping):
        return {str(k): json_safe(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return [json_safe(v, f"{key}[{i}]") for i, v in enumerate(items)]
    raise TypeError(
        f"{key} has a value of type {type(value).__name__} that cannot be stored in summary.json; "
        "convert it to a number, string, list or dict first"
    )
