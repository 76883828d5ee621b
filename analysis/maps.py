"""2-D margin maps over a `DCTGridSubspaces` family, their point reflection, and summary numbers."""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr

from frequency.grid import DCTGridSubspaces


def median_map(margins: np.ndarray, family: DCTGridSubspaces) -> np.ndarray:
    """Median margin over ALL samples (converged or not, as the release's plot) per block: `[A, B]` from `[S, N]`,
    entry (a, b) = block at frequencies `[a*stride, a*stride + k) x [b*stride, b*stride + k)`."""
    margins = np.asarray(margins, dtype=np.float64)
    if margins.ndim != 2 or margins.shape[0] != len(family):
        raise ValueError(f"margins must be [S={len(family)}, N] for {family!r}, got shape {margins.shape}")
    return np.median(margins, axis=1).reshape(family.grid_shape)


def point_reflect(grid_map: np.ndarray) -> np.ndarray:
    """Both frequency axes reversed: the block of frequencies (u, v) goes to (H-1-u, W-1-v), the frequency flip
    (exact for grids with `(H - k) % stride == 0`)."""
    return np.asarray(grid_map)[::-1, ::-1].copy()


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation over all entries of two maps of one shape."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"maps must have one shape, got {a.shape} and {b.shape}")
    return float(spearmanr(a, b).statistic)


def reflection_correlations(standard: np.ndarray, flipped: np.ndarray) -> dict[str, float]:
    """Spearman of the standard map with the flipped model's map point-reflected ("reflected") and as is."""
    return {"reflected": spearman(standard, point_reflect(flipped)), "unreflected": spearman(standard, flipped)}


def spread_ratio(margins: np.ndarray) -> float:
    """max / min over subspaces of the per-subspace median margin (all samples) of `margins: [S, N]`."""
    medians = np.median(np.asarray(margins, dtype=np.float64), axis=1)
    return float(medians.max() / medians.min())
