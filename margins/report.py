"""One writer for a margin measurement, shared by `evaluate_margin.py` and the margin callback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from margins.results import MarginReport, write_report


def summary_extra(
    iterations: np.ndarray, predicted: np.ndarray, targets: np.ndarray, seconds: float
) -> dict[str, float | int]:
    """Derived `extra` fields of a report: clean accuracy, seconds, number of samples, mean/max iterations."""
    return {
        "clean_accuracy": float((predicted == targets).mean()) if len(targets) else float("nan"),
        "seconds": float(seconds),
        "num_samples": int(len(targets)),
        "mean_iterations": float(iterations.mean()) if iterations.size else 0.0,
        "max_iterations": int(iterations.max()) if iterations.size else 0,
    }


def save_margin_report(
    output_dir: str | Path,
    margins: torch.Tensor | np.ndarray,
    converged: torch.Tensor | np.ndarray,
    iterations: torch.Tensor | np.ndarray,
    indices: np.ndarray,
    predicted: torch.Tensor | np.ndarray,
    targets: torch.Tensor | np.ndarray,
    settings: dict,
    seconds: float,
    title: str = "",
    figure: bool = True,
) -> Path:
    """Write `margins.npy` [S, N], `converged.npy` [S, N], `iterations.npy` [S, N], `indices.npy` [N], the clean
    labels, `summary.json` and `margins.png` whole or not at all (see `margins.results.write_report`).

    predicted / targets: [N] clean predicted and true labels of the evaluated samples (-> clean accuracy).
    seconds: wall time of the margin computation. settings: everything that produced the run.
    """
    predicted, targets = _numpy(predicted).astype(np.int64), _numpy(targets).astype(np.int64)
    iterations = _numpy(iterations).astype(np.int64)
    report = MarginReport(
        margins=_numpy(margins),
        converged=_numpy(converged),
        indices=np.asarray(indices),
        settings=settings,
        iterations=iterations,
        predicted=predicted,
        targets=targets,
        extra=summary_extra(iterations, predicted, targets, seconds),
    )
    return write_report(output_dir, report, figure=figure, title=title)


def _numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
