"""The paper's margin plot : every sample's margin per subspace plus the per-subspace median.

Pure matplotlib object API (`matplotlib.figure.Figure`), no pyplot state and no global backend change, so
it is safe in scripts, notebooks, Lightning callbacks and headless servers alike.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogFormatter

from margins.store.names import bound, quantity

SAMPLE_COLOR = "tab:blue"
NOT_CONVERGED_COLOR = "red"
MISCLASSIFIED_COLOR = "tab:orange"
MEDIAN_COLOR = "black"
IQR_COLOR = "tab:gray"
IQR_LABEL = "interquartile range (25-75%)"
EVOLUTION_LABEL = "median margin (L2)"


def describe_run(model: str = "", dataset: str = "", transform: str = "") -> str:
    """ "lenet on mnist (transform flip)": the run a figure shows; empty parts are left out."""
    text = " on ".join(part for part in (model, dataset) if part)
    if transform:
        text = f"{text} (transform {transform})" if text else f"transform {transform}"
    return text


def describe_settings(settings: Mapping[str, Any]) -> str:
    """`describe_run` of a result folder's settings (`MarginReport.settings`): model, dataset, transform."""
    model = settings.get("model", "")
    net = model.get("net", "") if isinstance(model, Mapping) else str(model or "")
    return describe_run(net, str(settings.get("dataset") or ""), str(settings.get("transform") or ""))


def plot_margins(
    margins: np.ndarray,
    converged: np.ndarray | None = None,
    title: str = "",
    ax: Axes | None = None,
    seed: int = 0,
    log_scale: bool = False,
    jitter: float = 0.1,
    misclassified: np.ndarray | None = None,
    subtitle: str = "",
    *,
    model: str = "",
    dataset: str = "",
    transform: str = "",
    legend: bool = True,
    estimator: str | None = None,
    family: str | None = None,
) -> Figure:
    """Scatter of `margins: [S, N]` (x = subspace index, low to high frequency) with the median line.

    Every (subspace s, sample n) is a dot at `x = s + jitter * N(0, 1)` (seeded, reproducible). Samples
    with `converged[s, n] == False` (DeepFool hit `max_iter`; their margin is only the accumulated
    perturbation) are drawn as red 'x' in a second scatter with their own legend entry. The median line
    is `np.median(margins, axis=1)` over ALL samples, converged or not, as in the original release's plot;
    a grey band spans the 25th to 75th percentile of each subspace.
    `misclassified: [N]` bool (clean prediction != ground truth): those samples' converged points are drawn
    as orange triangles, legend "misclassified (m of N samples)" (their margin is the distance to leave a
    WRONG label). The x axis shows every subspace index (a subset beyond 30), "Low"/"High" under the ends,
    and ends at the last subspace.

    Artists (stable, tests rely on them): one PathCollection labelled "samples" holding the converged
    (correctly classified) points, one labelled "not converged (k)" ("no label change found (k)" for certified
    bounds) only when k > 0, one labelled
    "misclassified (m of N samples)" only when m > 0, one Line2D labelled "median", one filled band labelled
    IQR_LABEL. Title: `title` (default `describe_run(model, dataset, transform)`), then `subtitle` (default
    "N samples, S subspaces" and the misclassified / not-converged counts) on a second line. The legend sits
    outside the axes, right of the data (`legend=False`: none, e.g. for a grid with `shared_legend`).
    `ax`: draw into this Axes (its figure is returned); otherwise a new standalone Figure is created.
    `log_scale`: logarithmic y axis (zero margins are then not shown).
    `estimator` ("deepfool", "fmn", "certify"; None: not said): the title ends with what the values are ("lenet
    on mnist: FMN margins", "...: certified lower bounds") and the y axis names it. `family` (a result folder's
    "subspace" kind): random subspaces and user bases have no frequency order, and their axis says so
    (`subspace_axis`).
    """
    margins = np.asarray(margins, dtype=np.float64)
    if margins.ndim != 2 or margins.size == 0:
        raise ValueError(f"margins must be a non-empty [S, N] array (subspaces x samples), got {margins.shape}")
    converged = _bool_mask(np.ones(margins.shape, dtype=bool) if converged is None else converged, margins.shape)
    wrong = _misclassified_mask(misclassified, margins.shape)
    if ax is None:
        fig = Figure(figsize=(8, 4), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    num_subspaces, num_samples = margins.shape
    index = np.broadcast_to(np.arange(num_subspaces, dtype=np.float64)[:, None], margins.shape)
    x = index + jitter * np.random.default_rng(seed).standard_normal(margins.shape)

    plain = converged & ~wrong
    ax.scatter(x[plain], margins[plain], s=6, alpha=0.4, color=SAMPLE_COLOR, label="samples")
    num_wrong = int(wrong[0].sum())
    if num_wrong:
        shown = converged & wrong
        label = f"misclassified ({num_wrong} of {num_samples} samples)"
        ax.scatter(x[shown], margins[shown], s=14, marker="^", alpha=0.7, color=MISCLASSIFIED_COLOR, label=label)
    missed = int((~converged).sum())
    if missed:
        ax.scatter(
            x[~converged],
            margins[~converged],
            s=18,
            marker="x",
            color=NOT_CONVERGED_COLOR,
            label=f"{_missed_label(estimator)} ({missed})",
        )
    subspaces = np.arange(num_subspaces)
    low, high = np.percentile(margins, [25, 75], axis=1)
    ax.fill_between(subspaces, low, high, color=IQR_COLOR, alpha=0.3, lw=0, label=IQR_LABEL)
    ax.plot(subspaces, np.median(margins, axis=1), ".-", color=MEDIAN_COLOR, lw=2, label="median")
    subspace_axis(ax, num_subspaces, family)
    ax.set_ylabel("Margin (L2)" if estimator is None else f"{_capital(quantity(estimator))} (L2)")
    if log_scale:
        plain_log_axis(ax)
    title = title or describe_run(model, dataset, transform)
    if estimator is not None:
        title = f"{title}: {quantity(estimator)}s" if title else f"{_capital(quantity(estimator))}s"
    subtitle = subtitle or _counts(num_samples, num_subspaces, num_wrong, missed, _missed_label(estimator))
    ax.set_title("\n".join(t for t in (title, subtitle) if t), fontsize="medium")
    if legend:
        outside_legend(ax)
    return fig


def _missed_label(estimator: str | None) -> str:
    """What `converged == False` means: an attack that did not change the label; for the certifier, that its
    upper-bound attack found no label change (the row has a certified bound but no interval)."""
    return "no label change found" if bound(estimator) == "lower" else "not converged"


def _counts(num_samples: int, num_subspaces: int, num_wrong: int, missed: int, what: str = "not converged") -> str:
    """ "100 samples, 21 subspaces, 2 misclassified, 1 not converged" (zero counts left out)."""
    parts = [f"{num_samples} samples", f"{num_subspaces} subspaces"]
    parts += [f"{num_wrong} misclassified"] if num_wrong else []
    parts += [f"{missed} {what}"] if missed else []
    return ", ".join(parts)


def outside_legend(ax: Axes, fontsize: str = "small") -> None:
    """The axes' legend right of its data area (never over the data); constrained layout makes room for it."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=fontsize)


def shared_legend(fig: Figure, axes: Sequence[Axes]) -> None:
    """One legend below the panels of `fig` (constrained layout) with every label of `axes` once; counts in
    parentheses are dropped ("not converged (3)" -> "not converged"), the panels' subtitles state them."""
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(re.sub(r" \(\d+( of \d+ samples)?\)$", "", label), handle)
    fig.legend(
        handles.values(),
        handles.keys(),
        loc="outside lower center",
        ncol=min(len(handles), 5, 2 * len(axes)),
        fontsize="small",
    )


def plain_log_axis(ax: Axes) -> None:
    """A logarithmic y axis labelled with plain numbers: the powers of ten and their 2x and 5x multiples."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:g}" if f"{value:.0e}"[0] in "25" else ""))


def grid_shape(count: int, max_columns: int = 3) -> tuple[int, int]:
    """(rows, columns) of `count` panels: as few rows as `max_columns` allows, the panels spread evenly over them."""
    if count < 1:
        raise ValueError(f"count must be >= 1 panels, got {count}")
    rows = -(-count // max_columns)
    return rows, -(-count // rows)


def panel_axes(fig: Figure, count: int, max_columns: int = 3) -> list[Axes]:
    """`count` axes on the rows of `grid_shape`, no blank panel: a shorter last row gets wider panels (one grid of
    `lcm` columns, each panel spanning its row's share)."""
    rows, columns = grid_shape(count, max_columns)
    last = count - columns * (rows - 1)
    width = math.lcm(columns, last)
    grid = fig.add_gridspec(rows, width)
    axes = []
    for i in range(count):
        row, col = divmod(i, columns)
        span = width // (last if row == rows - 1 else columns)
        axes.append(fig.add_subplot(grid[row, col * span : (col + 1) * span]))
    return axes


def _bool_mask(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != shape or mask.dtype != np.bool_:
        raise ValueError(f"converged must be a bool array of the margins' shape {shape}, got {mask.dtype} {mask.shape}")
    return mask


def _misclassified_mask(misclassified: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    """`[N]` bool per sample broadcast to `[S, N]` (all False when None)."""
    if misclassified is None:
        return np.zeros(shape, dtype=bool)
    misclassified = np.asarray(misclassified)
    if misclassified.shape != (shape[1],) or misclassified.dtype != np.bool_:
        raise ValueError(
            f"misclassified must be a bool array [N={shape[1]}], got {misclassified.dtype} {misclassified.shape}"
        )
    return np.broadcast_to(misclassified[None, :], shape)


def subspace_axis(ax: Axes, num_subspaces: int, family: str | None = None) -> None:
    """The x axis of a family of subspaces: `frequency_axis` for DCT families (and when `family` is None), the
    subspace indices under "random subspace (no frequency order)" or "user basis (in the given order)" otherwise."""
    labels = {"random": "Random subspace (no frequency order)", "basis": "User basis (in the given order)"}
    if family not in labels:
        frequency_axis(ax, num_subspaces)
        return
    every = max(1, int(np.ceil(num_subspaces / 30)))
    numbers = np.arange(0, num_subspaces, every)
    ax.set_xticks(numbers, [str(i) for i in numbers])
    ax.tick_params(axis="x", labelsize="small")
    ax.set_xlim(-0.5, num_subspaces - 0.5)
    ax.set_xlabel(labels[family])


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def frequency_axis(ax: Axes, num_subspaces: int, label: str = "Frequency") -> None:
    """Major ticks "Low"/"High" at the first and last subspace (set below the numbers), minor ticks labelled
    with the subspace indices (every k-th beyond 30 subspaces); the axis ends half a step past the first and the
    last subspace."""
    low, high = (0.0, num_subspaces - 1.0) if num_subspaces > 1 else (-0.5, 0.5)
    ax.set_xticks([low, high], ["Low", "High"])
    every = max(1, int(np.ceil(num_subspaces / 30)))
    numbers = np.arange(0, num_subspaces, every)
    ax.set_xticks(numbers, [str(i) for i in numbers], minor=True)
    ax.tick_params(axis="x", which="minor", labelsize="small")
    ax.tick_params(axis="x", which="major", length=0, pad=16)
    ax.xaxis.remove_overlapping_locs = False  # keep the numbers under "Low"/"High"
    ax.set_xlim(low - 0.5, high + 0.5)
    ax.set_xlabel(label)


def plot_margin_evolution(
    epochs: Sequence[int], medians: np.ndarray, title: str = "", *, num_samples: int | None = None
) -> Figure:
    """Heat map of the median margin of each subspace (rows, low frequency at the top) at each measured
    epoch (columns): `medians: [S, E]` for `epochs: [E]`. Log colour scale from the smallest positive to the
    largest median (non-positive medians are shown at the smallest positive value), stated in the colour bar's
    label "median margin (L2), a to b"; both axes labelled. Title: `title`, then "median margin per subspace of
    `num_samples` samples" (when given).
    """
    medians = np.asarray(medians, dtype=np.float64)
    if medians.ndim != 2 or medians.size == 0 or medians.shape[1] != len(epochs):
        raise ValueError(f"medians must be a non-empty [S, E={len(epochs)}] array, got {medians.shape}")
    positive = medians[medians > 0]
    floor = positive.min() if positive.size else 1e-6
    values = np.maximum(medians, floor)
    top = max(values.max(), floor * 1.0001)
    fig = Figure(figsize=(max(5.0, 3.0 + 0.35 * len(epochs)), 4), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(values, aspect="auto", cmap="viridis", norm=LogNorm(vmin=floor, vmax=top))
    ax.set_xticks(np.arange(len(epochs)), [str(e) for e in epochs])
    ax.set_xlabel("Epoch")
    rows = np.arange(0, medians.shape[0], max(1, int(np.ceil(medians.shape[0] / 12))))
    ax.set_yticks(rows, [str(r) for r in rows])
    ax.set_ylabel("Subspace (low → high frequency)")
    colorbar = fig.colorbar(image, ax=ax, label=f"{EVOLUTION_LABEL}, {value_range(floor, values.max())}")
    colorbar.ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))  # plain numbers, not 10^x
    colorbar.ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
    detail = f"median margin per subspace of {num_samples} samples" if num_samples else ""
    heading = "\n".join(t for t in (title, detail) if t)
    if heading:
        ax.set_title(heading, fontsize="medium")
    return fig


def value_range(low: float, high: float) -> str:
    """ "0.12 to 34.5": the range a colour scale spans, for its label."""
    return f"{low:.3g} to {high:.3g}"


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
