"""Fourier heat map. References: basis images from numpy's inverse FFT of a conjugate pair of deltas (Yin et al.'s
definition), and a model sensitive to exactly one known frequency."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from analysis.fourier_heatmap import fourier_basis, fourier_heatmap, representative_frequencies
from common.errors import InputError


class OneFrequencyModel(nn.Module):
    """Class 1 when |<u, x - 0.5>| > threshold, else class 0: sensitive only along the basis image u."""

    def __init__(self, u: torch.Tensor, threshold: float):
        super().__init__()
        self.register_buffer("u", u)
        self.threshold = threshold
        self.seen_min, self.seen_max = np.inf, -np.inf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_min, self.seen_max = min(self.seen_min, x.min().item()), max(self.seen_max, x.max().item())
        score = ((x - 0.5) * self.u).flatten(1).sum(1).abs() - self.threshold
        return torch.stack([-score, score], dim=1)


def test_basis_matches_numpy_ifft_of_conjugate_deltas():
    h, w = 6, 8
    for i, j in [(0, 0), (1, 2), (3, 4), (5, 7), (0, 4)]:
        spectrum = np.zeros((h, w), complex)
        spectrum[i, j] += 1
        spectrum[-i % h, -j % w] += 1
        reference = np.fft.ifft2(spectrum).real
        reference /= np.linalg.norm(reference)
        ours = fourier_basis(h, w, torch.tensor([i]), torch.tensor([j]))[0].numpy()
        np.testing.assert_allclose(ours, reference, atol=1e-12)


def test_representatives_cover_each_conjugate_pair_once():
    rows, cols = representative_frequencies(6, 8, None)
    pairs = {(min(i * 8 + j, (-i % 6) * 8 + (-j % 8))) for i, j in zip(rows.tolist(), cols.tolist())}
    assert len(pairs) == len(rows) == (48 + 4) // 2  # 4 self-conjugate frequencies in a 6x8 grid


@pytest.mark.parametrize("channels", [1, 3])
def test_peak_at_the_model_frequency_and_its_twin(channels):
    h, w, i0, j0 = 12, 10, 2, 3
    u = fourier_basis(h, w, torch.tensor([i0]), torch.tensor([j0]))[0].float()
    model = OneFrequencyModel(u.expand(channels, h, w) / channels**0.5, threshold=0.5)
    x = 0.5 + 0.005 * torch.randn(16, channels, h, w)
    x[0, 0, 0, 0] = 1.0  # a saturated pixel: the box must clamp it
    y = torch.zeros(16, dtype=torch.long)
    heat = fourier_heatmap(model, x, y, eps=1.0, batch_size=100)
    error = heat.error
    assert heat.clean_error == 0.0 and not np.isnan(error).any()
    assert error[i0, j0] == 1.0 and error[-i0 % h, -j0 % w] == 1.0
    others = np.ones_like(error, bool)
    others[i0, j0] = others[-i0 % h, -j0 % w] = False
    assert error[others].max() == 0.0
    centred = heat.centred()  # zero frequency at (h // 2, w // 2)
    assert centred[h // 2 + i0, w // 2 + j0] == 1.0 and centred[h // 2 - i0, w // 2 - j0] == 1.0
    assert model.seen_min >= 0.0 and model.seen_max <= 1.0  # clipped to the valid range


def test_radius_limits_frequencies_and_bad_eps_raises():
    model = OneFrequencyModel(torch.zeros(1, 8, 8), 0.5)
    x, y = torch.full((2, 1, 8, 8), 0.5), torch.zeros(2, dtype=torch.long)
    heat = fourier_heatmap(model, x, y, eps=1.0, radius=1)
    assert np.isfinite(heat.centred()[3:6, 3:6]).all() and np.isnan(heat.centred()[0, 0])
    with pytest.raises(InputError):
        fourier_heatmap(model, x, y, eps=0.0)


def test_heatmap_plot_labels_units_and_centre():
    from analysis.plots import plot_fourier_heatmaps

    model = OneFrequencyModel(fourier_basis(8, 8, torch.tensor([1]), torch.tensor([2]))[0].float()[None], 0.5)
    heat = fourier_heatmap(model, torch.full((4, 1, 8, 8), 0.5), torch.zeros(4, dtype=torch.long), eps=1.0)
    fig = plot_fourier_heatmaps({"toy": heat})
    ax, bar = fig.axes
    assert "cycles / image" in ax.get_xlabel() and "cycles / image" in ax.get_ylabel()
    assert bar.get_ylabel().startswith("error rate") and "eps = 1" in ax.get_title()
    image = ax.images[0].get_array()
    left, right, bottom, top = ax.images[0].get_extent()
    col = int(2 - left - 0.5)  # pixel column holding horizontal frequency +2
    row = int(1 - top - 0.5)  # pixel row holding vertical frequency +1
    assert image[row, col] == 1.0 and image.sum() == 2.0


def test_progress_bar_counts_the_frequencies(capsys):
    model = OneFrequencyModel(torch.zeros(1, 8, 8), 0.5)
    x, y = torch.full((2, 1, 8, 8), 0.5), torch.zeros(2, dtype=torch.long)
    total = len(representative_frequencies(8, 8, None)[0])
    fourier_heatmap(model, x, y, eps=1.0, batch_size=4, progress=True)  # 2 frequencies per forward pass
    err = capsys.readouterr().err
    assert "Fourier heat map: frequencies (each on 2 samples): 100%" in err and f"{total}/{total}" in err
    fourier_heatmap(model, x, y, eps=1.0, batch_size=4)
    assert capsys.readouterr().err == ""
