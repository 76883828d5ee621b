"""The paper's margin plot (REFERENCE §1): every sample's margin per subspace plus the per-subspace median.

Pure matplotlib object API (`matplotlib.figure.Figure`), no pyplot state and no global backend change, so
it is safe in scripts, notebooks, Lightning callbacks and headless servers alike.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib.image
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

SAMPLE_COLOR = "tab:blue"
NOT_CONVERGED_COLOR = "red"
MEDIAN_COLOR = "black"


def plot_margins(
    margins: np.ndarray,
    converged: np.ndarray | None = None,
    title: str = "",
    ax: Axes | None = None,
    seed: int = 0,
    log_scale: bool = False,
    jitter: float = 0.1,
) -> Figure:
    """Scatter of `margins: [S, N]` (x = subspace index, low to high frequency) with the median line.

    Every (subspace s, sample n) is a dot at `x = s + jitter * N(0, 1)` (seeded, reproducible). Samples
    with `converged[s, n] == False` (DeepFool hit `max_iter`; their margin is only the accumulated
    perturbation) are drawn as red 'x' in a second scatter with their own legend entry. The median line
    is `np.median(margins, axis=1)` over ALL samples, converged or not, as in the original release's plot.

    Artists (stable, tests rely on them): one PathCollection labelled "samples" holding the converged
    points, one labelled "not converged (k)" only when k > 0, one Line2D labelled "median".
    `ax`: draw into this Axes (its figure is returned); otherwise a new standalone Figure is created.
    `log_scale`: logarithmic y axis (zero margins are then not shown).
    """
    margins = np.asarray(margins, dtype=np.float64)
    if margins.ndim != 2 or margins.size == 0:
        raise ValueError(f"margins must be a non-empty [S, N] array (subspaces x samples), got {margins.shape}")
    if converged is None:
        converged = np.ones(margins.shape, dtype=bool)
    converged = np.asarray(converged)
    if converged.shape != margins.shape or converged.dtype != np.bool_:
        raise ValueError(
            f"converged must be a bool array of the margins' shape {margins.shape}, got {converged.dtype} "
            f"{converged.shape}"
        )
    if ax is None:
        fig = Figure(figsize=(8, 4), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    num_subspaces = margins.shape[0]
    index = np.broadcast_to(np.arange(num_subspaces, dtype=np.float64)[:, None], margins.shape)
    x = index + jitter * np.random.default_rng(seed).standard_normal(margins.shape)

    ax.scatter(x[converged], margins[converged], s=6, alpha=0.4, color=SAMPLE_COLOR, label="samples")
    missed = int((~converged).sum())
    if missed:
        ax.scatter(
            x[~converged],
            margins[~converged],
            s=18,
            marker="x",
            color=NOT_CONVERGED_COLOR,
            label=f"not converged ({missed})",
        )
    ax.plot(np.arange(num_subspaces), np.median(margins, axis=1), ".-", color=MEDIAN_COLOR, lw=2, label="median")
    _frequency_axis(ax, num_subspaces)
    ax.set_ylabel("Margin (L2)")
    if log_scale:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.legend(loc="upper left", fontsize="small")
    return fig


def _frequency_axis(ax: Axes, num_subspaces: int) -> None:
    """x ticks "Low" at the first subspace and "High" at the last, x label "Frequency"."""
    low, high = (0.0, num_subspaces - 1.0) if num_subspaces > 1 else (-0.5, 0.5)
    ax.set_xticks([low, high], ["Low", "High"])
    ax.set_xlim(low - 0.6, high + 0.6)
    ax.set_xlabel("Frequency")


def save_figure(fig: Figure, path: str | Path, dpi: int = 150) -> Path:
    """Save `fig` (format from the suffix, e.g. .png/.pdf); creates parent directories. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def figure_to_array(fig: Figure, dpi: int = 100) -> np.ndarray:
    """RGB pixels `[H, W, 3]` uint8 of `fig`, e.g. for TensorBoard `add_image(tag, img, dataformats="HWC")`.

    Renders through an in-memory PNG, so the figure's own canvas (pyplot or not) is left untouched.
    """
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    buffer.seek(0)
    rgba = matplotlib.image.imread(buffer, format="png")  # float32 [H, W, 4] in [0, 1]
    return np.round(rgba[..., :3] * 255.0).astype(np.uint8)
