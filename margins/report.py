"""One writer for a margin measurement, shared by `evaluate_margin.py` and the margin callback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from margins.results import write_margin_results


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
    """Write `margins.npy` [S, N], `converged.npy` [S, N], `indices.npy` [N], `summary.json` and `margins.png`
    whole or not at all (see `write_margin_results`).

    predicted / targets: [N] clean predicted and true labels of the evaluated samples (-> clean accuracy).
    seconds: wall time of the margin computation. settings: everything that produced the run.
    """
    predicted, targets = _numpy(predicted).astype(np.int64), _numpy(targets).astype(np.int64)
    iterations = _numpy(iterations)
    extra = {
        "clean_accuracy": float((predicted == targets).mean()) if len(targets) else float("nan"),
        "seconds": float(seconds),
        "num_samples": int(len(indices)),
        "mean_iterations": float(iterations.mean()) if iterations.size else 0.0,
        "max_iterations": int(iterations.max()) if iterations.size else 0,
    }
    return write_margin_results(
        output_dir, margins, converged, indices, settings, figure=figure, extra=extra, title=title
    )


def _numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
