"""The margin figure's elements (subspace ticks, title, IQR band, misclassified samples), the evolution heat map, and
what makes a figure fit for a paper: complete titles, legends off the data, axes ending at the last subspace,
colour scales spanning the data, grids without blank panels."""

from __future__ import annotations

import matplotlib.colors as mcolors
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PathCollection, PolyCollection
from matplotlib.figure import Figure

from plotting.margins import (
    EVOLUTION_LABEL,
    IQR_LABEL,
    MISCLASSIFIED_COLOR,
    describe_run,
    describe_settings,
    figure_to_array,
    grid_shape,
    panel_axes,
    plot_margin_evolution,
    plot_margins,
    shared_legend,
)


def example(num_subspaces: int = 6, num_samples: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    margins = rng.gamma(2.0, 1.0, size=(num_subspaces, num_samples))
    converged = np.ones(margins.shape, dtype=bool)
    converged[2, 3] = False
    misclassified = np.zeros(num_samples, dtype=bool)
    misclassified[[1, 5]] = True
    return margins, converged, misclassified


def test_misclassified_samples_are_drawn_apart_and_counted_in_the_legend():
    margins, converged, wrong = example()
    ax = plot_margins(margins, converged, misclassified=wrong).axes[0]
    by_label = {c.get_label(): c for c in ax.collections if isinstance(c, PathCollection)}
    label = "misclassified (2 of 8 samples)"
    assert set(by_label) == {"samples", "not converged (1)", label}
    np.testing.assert_allclose(np.sort(by_label[label].get_offsets()[:, 1]), np.sort(margins[:, wrong].ravel()))
    np.testing.assert_allclose(
        np.sort(by_label["samples"].get_offsets()[:, 1]), np.sort(margins[converged & ~wrong[None, :]])
    )
    assert np.allclose(by_label[label].get_facecolor()[0][:3], mcolors.to_rgb(MISCLASSIFIED_COLOR))
    assert label in [t.get_text() for t in ax.get_legend().get_texts()]


def test_interquartile_band_subspace_ticks_and_title():
    margins, converged, _ = example(num_subspaces=21)
    ax = plot_margins(margins, converged, title="lenet on mnist (transform none)", subtitle="epoch 4, 8 samples").axes[
        0
    ]
    (band,) = [c for c in ax.collections if isinstance(c, PolyCollection) and c.get_label() == IQR_LABEL]
    vertices = band.get_paths()[0].vertices
    q25, q75 = np.percentile(margins, [25, 75], axis=1)
    assert np.isclose(vertices[:, 1].min(), q25.min()) and np.isclose(vertices[:, 1].max(), q75.max())
    assert IQR_LABEL in [t.get_text() for t in ax.get_legend().get_texts()]
    minor = [t.get_text() for t in ax.get_xticklabels(minor=True)]
    assert minor == [str(i) for i in range(21)]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Low", "High"]
    assert ax.get_title() == "lenet on mnist (transform none)\nepoch 4, 8 samples"


def test_many_subspaces_label_every_kth_and_bad_misclassified_is_rejected():
    margins = np.ones((64, 3))
    ax = plot_margins(margins).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels(minor=True)][:3] == ["0", "3", "6"]
    with pytest.raises(ValueError, match="misclassified"):
        plot_margins(margins, misclassified=np.zeros(4, dtype=bool))


def test_evolution_heat_map_has_log_colours_a_colour_bar_and_labelled_axes():
    medians = np.array([[0.5, 1.0, 2.0], [4.0, 8.0, 0.0]])  # [S=2, E=3]; a zero median is floored, not dropped
    fig = plot_margin_evolution([0, 4, 9], medians, title="lenet on mnist")
    ax, colorbar_ax = fig.axes
    (image,) = ax.get_images()
    assert isinstance(image.norm, mcolors.LogNorm) and image.norm.vmin == 0.5 and image.norm.vmax == 8.0
    assert image.get_array().shape == (2, 3)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "4", "9"]
    assert ax.get_xlabel() == "Epoch" and "Subspace" in ax.get_ylabel()
    assert colorbar_ax.get_ylabel() == f"{EVOLUTION_LABEL}, 0.5 to 8" and ax.get_title() == "lenet on mnist"
    assert figure_to_array(fig, dpi=40).shape[2] == 3
    with pytest.raises(ValueError, match="E=2"):
        plot_margin_evolution([0, 1], medians)


def drawn(fig: Figure) -> Figure:
    """`fig` laid out and drawn (Agg), so that artists have their final window extents."""
    FigureCanvasAgg(fig).draw()
    return fig


def test_title_names_model_dataset_transform_and_counts():
    margins, converged, wrong = example(num_subspaces=21)
    ax = plot_margins(margins, converged, misclassified=wrong, model="lenet", dataset="mnist", transform="flip").axes[0]
    assert (
        ax.get_title() == "lenet on mnist (transform flip)\n8 samples, 21 subspaces, 2 misclassified, 1 not converged"
    )
    titled = plot_margins(margins, title="my run").axes[0]  # a caller's own title keeps the sample count
    assert titled.get_title() == "my run\n8 samples, 21 subspaces"
    settings = {"model": {"net": "resnet18"}, "dataset": "cifar10", "transform": "low_pass"}
    assert describe_settings(settings) == describe_run("resnet18", "cifar10", "low_pass")
    assert describe_settings({"model": "Sequential"}) == "Sequential"


@pytest.mark.parametrize("num_subspaces", [3, 13, 21, 64])
def test_legend_stays_off_the_data_and_the_axis_ends_at_the_last_subspace(num_subspaces):
    margins, converged, wrong = example(num_subspaces=num_subspaces, num_samples=30)
    fig = drawn(plot_margins(margins, converged, misclassified=wrong, model="lenet", dataset="mnist"))
    ax = fig.axes[0]
    assert not ax.get_legend().get_window_extent().overlaps(ax.get_window_extent())
    last = num_subspaces - 1
    assert ax.get_xlim() == (-0.5, last + 0.5)
    ticks = [t for t in ax.get_xticks(minor=True)] + list(ax.get_xticks())
    assert max(ticks) <= last and min(ticks) >= 0


def test_evolution_title_states_the_sample_count():
    fig = plot_margin_evolution([0, 1], np.array([[1.0, 2.0]]), title="lenet on mnist (transform none)", num_samples=30)
    assert fig.axes[0].get_title() == "lenet on mnist (transform none)\nmedian margin per subspace of 30 samples"


@pytest.mark.parametrize(
    ("count", "shape"), [(1, (1, 1)), (2, (1, 2)), (3, (1, 3)), (4, (2, 2)), (5, (2, 3)), (7, (3, 3))]
)
def test_panel_grid_has_one_axes_per_panel_and_no_blank_space(count, shape):
    fig = Figure(figsize=(9, 6), layout="constrained")
    axes = panel_axes(fig, count)
    assert len(fig.axes) == count == len(axes) and grid_shape(count) == shape
    assert len({ax.get_subplotspec().rowspan.start for ax in axes}) == shape[0]
    spans = {}
    for ax in axes:
        spec = ax.get_subplotspec()
        spans.setdefault(spec.rowspan.start, []).append(spec.colspan)
    width = spec.get_gridspec().ncols
    for row in spans.values():  # every row is filled from its first to its last grid column
        assert sorted(c.start for c in row)[0] == 0 and sum(len(c) for c in row) == width
    with pytest.raises(ValueError, match="count"):
        panel_axes(fig, 0)


def test_shared_legend_below_the_panels_lists_each_label_once():
    fig = Figure(figsize=(9, 6), layout="constrained")
    axes = panel_axes(fig, 2)
    for k, ax in enumerate(axes):
        margins, converged, _ = example(num_samples=6 + k)
        plot_margins(margins, converged, ax=ax, legend=False)
    shared_legend(fig, axes)
    drawn(fig)
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert sorted(labels) == sorted(["samples", "not converged", IQR_LABEL, "median"])
    assert all(ax.get_legend() is None for ax in axes)
    assert not any(legend.get_window_extent().overlaps(ax.get_window_extent()) for ax in axes)
