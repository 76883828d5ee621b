"""Learning-rate schedules (pure functions; the Lightning module turns them into a LambdaLR)."""

from __future__ import annotations


def triangular_lr(step: int, total_steps: int, peak_lr: float, peak_fraction: float = 0.4) -> float:
    """Learning rate of optimizer step `step` (0-based) out of `total_steps` (the original release's recipe).

    Piecewise linear in training progress `t = (step + 1) / total_steps`: 0 at t = 0, `peak_lr` at
    t = `peak_fraction`, 0 at t = 1. Like the release, step `i` uses the rate at the end of its own batch.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0.0 < peak_fraction < 1.0:
        raise ValueError(f"peak_fraction must be in (0, 1), got {peak_fraction}")
    t = min(max((step + 1) / total_steps, 0.0), 1.0)
    if t <= peak_fraction:
        return peak_lr * t / peak_fraction
    return peak_lr * (1.0 - t) / (1.0 - peak_fraction)
