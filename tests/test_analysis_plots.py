"""The analyses' figures fit for a paper: titles naming the run, the samples and the subspaces; colour scales spanning
the data with their range stated; legends off the data; axes ending at the last subspace; comparison titles saying
which test ran."""

from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from analysis.compare import Run, compare_runs, plot_comparison
from analysis.fourier_heatmap import FourierHeatmap
from analysis.plots import plot_dct_vs_random, plot_fourier_heatmaps, plot_margin_maps
from frequency.grid import DCTGridSubspaces


def drawn(fig: Figure) -> Figure:
    FigureCanvasAgg(fig).draw()
    return fig


def assert_ends_at_last_subspace(ax, num_subspaces: int) -> None:
    assert ax.get_xlim() == (-0.5, num_subspaces - 0.5)
    ticks = [*ax.get_xticks(), *ax.get_xticks(minor=True)]
    assert 0 <= min(ticks) and max(ticks) <= num_subspaces - 1


def test_margin_maps_state_block_stride_samples_and_the_fitted_range():
    family = DCTGridSubspaces((1, 28, 28), block=8, stride=4)
    rng = np.random.default_rng(0)
    maps = {"lenet on mnist (transform none)": rng.uniform(2, 30, (6, 6)), "flipped": rng.uniform(0.5, 9, (6, 6))}
    fig = plot_margin_maps(maps, family, "2-D margin maps", num_samples=100)
    *panels, bar = fig.axes
    assert len(panels) == 2 and [ax.get_title() for ax in panels] == list(maps)
    low, high = min(m.min() for m in maps.values()), max(m.max() for m in maps.values())
    assert panels[0].images[0].norm.vmin == low and panels[0].images[0].norm.vmax == high
    assert f"{low:.3g} to {high:.3g}" in bar.get_ylabel()
    assert fig.get_suptitle() == "2-D margin maps\nmedian margin per 8x8 DCT block, stride 4, 100 samples"


def test_heat_map_colours_span_the_error_rates_not_zero_to_one():
    error = np.array([[0.1, 0.3], [0.5, np.nan]])
    heat = FourierHeatmap(error, eps=4.0, clean_error=0.02, num_samples=50, valid="box", seed=0, radius=None)
    fig = plot_fourier_heatmaps({"lenet on mnist (transform none)": heat})
    ax, bar = fig.axes
    assert ax.images[0].get_clim() == (0.1, 0.5)
    assert "0.1 to 0.5" in bar.get_ylabel()
    assert ax.get_title() == "lenet on mnist (transform none)\n(eps = 4 L2, clean error 0.020, 50 samples)"


def test_dct_vs_random_legend_below_the_panels_and_axis_ending_at_the_last_block():
    rng = np.random.default_rng(0)
    panels = {name: (rng.uniform(1, 9, (21, 12)), rng.uniform(3, 4, (21, 12))) for name in ("standard", "flipped")}
    fig = drawn(plot_dct_vs_random(panels, "DCT vs random"))
    assert len(fig.axes) == 2
    (legend,) = fig.legends
    for ax, name in zip(fig.axes, panels):
        assert ax.get_legend() is None and not legend.get_window_extent().overlaps(ax.get_window_extent())
        assert ax.get_title() == f"{name}\n12 samples, 21 DCT blocks vs 21 random subspaces"
        assert_ends_at_last_subspace(ax, 21)


def runs_with(indices_b: np.ndarray) -> list[Run]:
    rng = np.random.default_rng(0)
    margins = rng.uniform(1, 5, (21, 10))
    ones = np.ones(margins.shape, bool)
    return [
        Run("standard", margins, ones, np.arange(10), "lenet on mnist (transform none)"),
        Run("flipped", margins * 3, ones, indices_b, "lenet on mnist (transform flip)"),
    ]


def test_comparison_title_names_the_paired_test_and_the_legend_the_runs():
    runs = runs_with(np.arange(10))
    fig = drawn(plot_comparison(runs, compare_runs(runs), "LeNet, standard vs flipped"))
    (ax,) = fig.axes
    assert ax.get_title().splitlines() == [
        "LeNet, standard vs flipped",
        "Median margin per subspace, interquartile band",
        "* = paired Wilcoxon signed-rank p < 0.01 vs standard (10 paired samples)",
    ]
    (legend,) = fig.legends
    labels = [f"{r.name}: {r.description}, DeepFool margins, 10 samples" for r in runs]  # Run's default estimator
    assert [t.get_text() for t in legend.get_texts()] == labels
    assert not legend.get_window_extent().overlaps(ax.get_window_extent())
    assert any(line.get_marker() == "*" for line in ax.lines)
    assert_ends_at_last_subspace(ax, 21)


def test_comparison_without_shared_samples_promises_no_stars():
    runs = runs_with(np.arange(10, 20))
    (ax,) = plot_comparison(runs, compare_runs(runs)).axes
    assert ax.get_title().splitlines()[-1] == "no paired test: samples differ from standard (indices.npy)"
    assert not any(line.get_marker() == "*" for line in ax.lines)
