"""Figures of the analyses (matplotlib object API, no pyplot state): 2-D margin maps, Fourier heat maps, DCT vs
random-subspace margins. Every axis and colour bar names its quantity and unit, every colour scale spans the data
(its range in the colour bar's label), legends sit outside the data and the titles say what was measured: the
callers name the run (`plotting.margins.describe_run`), the figures add the sample count and the subspaces."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

from analysis.fourier_heatmap import FourierHeatmap
from frequency.grid import DCTGridSubspaces
from plotting.margins import frequency_axis, plain_log_axis, shared_legend, value_range

MARGIN_UNIT = "median margin (L2, [0, 1] pixel units)"


def plot_margin_maps(
    maps: Mapping[str, np.ndarray],
    family: DCTGridSubspaces,
    suptitle: str = "",
    *,
    num_samples: int | None = None,
    quantity: str = "margin",
) -> Figure:
    """Side-by-side 2-D maps `[A, B]` of the median margin per DCT block, one shared log colour scale from the
    smallest positive to the largest median. A cell sits at its block's centre frequency; its colour is the block's
    median margin. Panel titles: the keys of `maps`; the figure's title: `suptitle`, then the block side, the
    stride and `num_samples`. `quantity`: what the values are ("margin", "certified lower bound", ...)."""
    values = np.concatenate([np.asarray(m, dtype=np.float64).ravel() for m in maps.values()])
    positive = values[values > 0]
    low, high = positive.min(), max(positive.max(), positive.min() * 1.0001)
    norm = LogNorm(vmin=low, vmax=high)
    fig = Figure(figsize=(4.2 * len(maps) + 1.0, 4.8), layout="constrained")
    axes = fig.subplots(1, len(maps), squeeze=False)[0]
    centre = (family.block - 1) / 2
    half = family.stride / 2
    rows, cols = family.row_starts.numpy() + centre, family.col_starts.numpy() + centre
    extent = (cols[0] - half, cols[-1] + half, rows[-1] + half, rows[0] - half)
    for ax, (title, grid_map) in zip(axes, maps.items()):
        image = ax.imshow(grid_map, norm=norm, cmap="viridis", extent=extent, interpolation="nearest")
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("horizontal DCT frequency index (block centre)")
        ax.set_ylabel("vertical DCT frequency index (block centre)")
    unit = MARGIN_UNIT.replace("margin", quantity)
    bar = fig.colorbar(image, ax=list(axes), label=f"{unit}\n{value_range(positive.min(), positive.max())}")
    bar.ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))  # plain numbers, not 10^x
    bar.ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
    detail = f"median {quantity} per {family.block}x{family.block} DCT block, stride {family.stride}"
    detail += f", {num_samples} samples" if num_samples else ""
    fig.suptitle("\n".join(t for t in (suptitle, detail) if t), fontsize="medium")
    return fig


def plot_fourier_heatmaps(heatmaps: Mapping[str, FourierHeatmap], suptitle: str = "") -> Figure:
    """Side-by-side Fourier heat maps (error rate per 2-D frequency, zero frequency at the centre), one colour
    scale from the lowest to the highest error rate of all maps. Panel titles: the keys, then eps, the clean error
    and the sample count of each map."""
    errors = np.concatenate([np.asarray(h.error, dtype=np.float64).ravel() for h in heatmaps.values()])
    low, high = float(np.nanmin(errors)), float(np.nanmax(errors))
    fig = Figure(figsize=(4.2 * len(heatmaps) + 1.0, 4.0), layout="constrained")
    axes = fig.subplots(1, len(heatmaps), squeeze=False)[0]
    for ax, (title, heat) in zip(axes, heatmaps.items()):
        h, w = heat.error.shape
        extent = (-(w // 2) - 0.5, w - w // 2 - 0.5, h - h // 2 - 0.5, -(h // 2) - 0.5)
        image = ax.imshow(heat.centred(), vmin=low, vmax=max(high, low + 1e-9), cmap="magma", extent=extent,
                          interpolation="nearest")  # fmt: skip
        detail = f"eps = {heat.eps:g} L2, clean error {heat.clean_error:.3f}, {heat.num_samples} samples"
        ax.set_title(f"{title}\n({detail})", fontsize="medium")
        ax.set_xlabel("horizontal Fourier frequency (cycles / image)")
        ax.set_ylabel("vertical Fourier frequency (cycles / image)")
    fig.colorbar(image, ax=list(axes), label=f"error rate (fraction of samples)\n{value_range(low, high)}")
    if suptitle:
        fig.suptitle(suptitle, fontsize="medium")
    return fig


def plot_dct_vs_random(
    panels: Mapping[str, tuple[np.ndarray, np.ndarray]], suptitle: str = "", quantity: str = "margin"
) -> Figure:
    """Per panel: DCT margins `[S, N]` as median line with interquartile band (x: subspace, low to high frequency),
    beside random subspaces' margins `[R, N]` of the same dimension as a band from the lowest to the highest
    per-subspace median (with the median of those medians dashed). Log margin axis; one legend below the panels.
    Panel titles: the keys, then the sample and subspace counts. `quantity`: what the values are (the y axis)."""
    fig = Figure(figsize=(max(6.5, 5.0 * len(panels)), 4.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, (dct, random)) in zip(axes, panels.items()):
        dct, random = np.asarray(dct, dtype=np.float64), np.asarray(random, dtype=np.float64)
        x = np.arange(dct.shape[0])
        q25, med, q75 = np.percentile(dct, [25, 50, 75], axis=1)
        ax.fill_between(x, q25, q75, color="tab:blue", alpha=0.25, label="DCT blocks: interquartile range")
        ax.plot(x, med, ".-", color="tab:blue", label="DCT blocks: median")
        rmed = np.median(random, axis=1)
        ax.axhspan(rmed.min(), rmed.max(), color="tab:orange", alpha=0.3, label="random subspaces: range of medians")
        ax.axhline(np.median(rmed), color="tab:orange", ls="--", label="random subspaces: median of medians")
        plain_log_axis(ax)
        frequency_axis(ax, dct.shape[0], "DCT subspace (frequency)")
        ax.set_ylabel(f"{quantity} (L2, [0, 1] pixel units)")
        counts = f"{dct.shape[1]} samples, {dct.shape[0]} DCT blocks vs {len(rmed)} random subspaces"
        ax.set_title(f"{title}\n{counts}" if title else counts, fontsize="medium")
    shared_legend(fig, axes)
    if suptitle:
        fig.suptitle(suptitle, fontsize="medium")
    return fig
