"""Figures of the analyses (matplotlib object API, no pyplot state): 2-D margin maps, Fourier heat maps, DCT vs
random-subspace margins. Every axis and colour bar names its quantity and unit."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from analysis.fourier_heatmap import FourierHeatmap
from frequency.grid import DCTGridSubspaces

MARGIN_UNIT = "median margin (L2, [0, 1] pixel units)"


def plot_margin_maps(maps: Mapping[str, np.ndarray], family: DCTGridSubspaces, suptitle: str = "") -> Figure:
    """Side-by-side 2-D maps `[A, B]` of the median margin per DCT block, one shared log colour scale.

    A cell sits at its block's centre frequency; its colour is the block's median margin."""
    values = np.concatenate([np.asarray(m, dtype=np.float64).ravel() for m in maps.values()])
    positive = values[values > 0]
    norm = LogNorm(vmin=positive.min(), vmax=positive.max())
    fig = Figure(figsize=(4.2 * len(maps) + 1.0, 4.0), layout="constrained")
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
    fig.colorbar(image, ax=list(axes), label=MARGIN_UNIT)
    if suptitle:
        fig.suptitle(suptitle, fontsize="medium")
    return fig


def plot_fourier_heatmaps(heatmaps: Mapping[str, FourierHeatmap], suptitle: str = "") -> Figure:
    """Side-by-side Fourier heat maps (error rate per 2-D frequency, zero frequency at the centre)."""
    fig = Figure(figsize=(4.2 * len(heatmaps) + 1.0, 4.0), layout="constrained")
    axes = fig.subplots(1, len(heatmaps), squeeze=False)[0]
    for ax, (title, heat) in zip(axes, heatmaps.items()):
        h, w = heat.error.shape
        extent = (-(w // 2) - 0.5, w - w // 2 - 0.5, h - h // 2 - 0.5, -(h // 2) - 0.5)
        image = ax.imshow(heat.centred(), vmin=0.0, vmax=1.0, cmap="magma", extent=extent, interpolation="nearest")
        ax.set_title(f"{title}\n(eps = {heat.eps:g} L2, clean error {heat.clean_error:.3f})", fontsize="medium")
        ax.set_xlabel("horizontal Fourier frequency (cycles / image)")
        ax.set_ylabel("vertical Fourier frequency (cycles / image)")
    fig.colorbar(image, ax=list(axes), label="error rate (fraction of samples)")
    if suptitle:
        fig.suptitle(suptitle, fontsize="medium")
    return fig


def plot_dct_vs_random(panels: Mapping[str, tuple[np.ndarray, np.ndarray]], suptitle: str = "") -> Figure:
    """Per panel: DCT margins `[S, N]` as median line with interquartile band (x: subspace, low to high frequency),
    beside random subspaces' margins `[R, N]` of the same dimension as a band from the lowest to the highest
    per-subspace median (with the median of those medians dashed). Log margin axis."""
    fig = Figure(figsize=(5.0 * len(panels), 3.8), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, (dct, random)) in zip(axes, panels.items()):
        dct, random = np.asarray(dct, dtype=np.float64), np.asarray(random, dtype=np.float64)
        x = np.arange(dct.shape[0])
        q25, med, q75 = np.percentile(dct, [25, 50, 75], axis=1)
        ax.fill_between(x, q25, q75, color="tab:blue", alpha=0.25, label="DCT blocks: interquartile range")
        ax.plot(x, med, ".-", color="tab:blue", label="DCT blocks: median")
        rmed = np.median(random, axis=1)
        ax.axhspan(rmed.min(), rmed.max(), color="tab:orange", alpha=0.3, label=f"{len(rmed)} random: median range")
        ax.axhline(np.median(rmed), color="tab:orange", ls="--", label="random: median of medians")
        ax.set_yscale("log")
        ax.set_xticks([0, x[-1]], ["Low", "High"])
        ax.set_xlabel("DCT subspace (frequency)")
        ax.set_ylabel("margin (L2, [0, 1] pixel units)")
        ax.set_title(title, fontsize="medium")
        ax.legend(fontsize="x-small", loc="best", framealpha=0.7)
    if suptitle:
        fig.suptitle(suptitle, fontsize="medium")
    return fig
