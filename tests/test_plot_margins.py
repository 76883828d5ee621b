"""The margin figure's new elements (subspace ticks, title, IQR band, misclassified samples) and the
evolution heat map."""

from __future__ import annotations

import matplotlib.colors as mcolors
import numpy as np
import pytest
from matplotlib.collections import PathCollection, PolyCollection

from margins.plot import IQR_LABEL, MISCLASSIFIED_COLOR, figure_to_array, plot_margin_evolution, plot_margins


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
    assert colorbar_ax.get_ylabel() == "median margin (L2)" and ax.get_title() == "lenet on mnist"
    assert figure_to_array(fig, dpi=40).shape[2] == 3
    with pytest.raises(ValueError, match="E=2"):
        plot_margin_evolution([0, 1], medians)
