"""One writer for a margin measurement, shared by `evaluate_margin.py` and the margin callback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from margins.results import MarginReport, write_report


def build_report(
    margins: torch.Tensor | np.ndarray,
    converged: torch.Tensor | np.ndarray,
    iterations: torch.Tensor | np.ndarray,
    indices: np.ndarray,
    predicted: torch.Tensor | np.ndarray,
    targets: torch.Tensor | np.ndarray,
    settings: dict,
    seconds: float,
    perturbed_labels: torch.Tensor | np.ndarray | None = None,
    extra: dict | None = None,
) -> MarginReport:
    """A `MarginReport` with the derived `extra` fields: clean accuracy, seconds, mean/max iterations.

    margins / converged / iterations / perturbed_labels: [S, N]; indices / predicted / targets: [N].
    """
    predicted, targets = _numpy(predicted).astype(np.int64), _numpy(targets).astype(np.int64)
    iterations = _numpy(iterations).astype(np.int64)
    derived = {
        "clean_accuracy": float((predicted == targets).mean()) if len(targets) else float("nan"),
        "seconds": float(seconds),
        "num_samples": int(len(indices)),
        "mean_iterations": float(iterations.mean()) if iterations.size else 0.0,
        "max_iterations": int(iterations.max()) if iterations.size else 0,
    }
    return MarginReport(
        margins=_numpy(margins),
        converged=_numpy(converged),
        indices=np.asarray(indices),
        settings=settings,
        iterations=iterations,
        perturbed_labels=None if perturbed_labels is None else _numpy(perturbed_labels),
        predicted=predicted,
        targets=targets,
        extra={**derived, **(extra or {})},
    )


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
    report = build_report(margins, converged, iterations, indices, predicted, targets, settings, seconds)
    return write_report(output_dir, report, figure=figure, title=title)


def _numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
