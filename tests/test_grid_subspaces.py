"""DCTGridSubspaces against a dense basis built with scipy's DCT (the independent reference)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import torch
from torch import nn

from attacks.deepfool import SubspaceDeepFool
from frequency.grid import DCTGridSubspaces

SHAPE = (2, 12, 10)  # two channels, non-square: catches swapped axes


def dense_projectors(family: DCTGridSubspaces) -> list[np.ndarray]:
    """P_s = B_s B_s^T with B_s's columns the scipy IDCT of every one-hot atom in block s (all channels)."""
    c, h, w = family.image_shape
    out = []
    for r0, c0 in family.positions:
        cols = []
        for ch in range(c):
            for r in range(r0, r0 + family.block):
                for q in range(c0, c0 + family.block):
                    coef = np.zeros((c, h, w))
                    coef[ch, r, q] = 1.0
                    cols.append(scipy.fft.idctn(coef, axes=(1, 2), norm="ortho").ravel())
        basis = np.stack(cols, axis=1)
        out.append(basis @ basis.T)
    return out


def our_projector(family: DCTGridSubspaces, s: int) -> np.ndarray:
    d = int(np.prod(family.image_shape))
    eye = torch.eye(d, dtype=torch.float64).view(d, *family.image_shape)
    return family.project(eye, torch.full((d,), s)).view(d, d).numpy().T


def test_grid_layout():
    family = DCTGridSubspaces((1, 28, 28), block=8, stride=4)
    assert family.grid_shape == (6, 6) and len(family) == 36
    assert family.positions[0] == (0, 0) and family.positions[7] == (4, 4) and family.positions[-1] == (20, 20)
    assert family.dims == [64] * 36


def test_projector_matches_scipy_dense_basis():
    family = DCTGridSubspaces(SHAPE, block=4, stride=3)
    assert family.grid_shape == (3, 3)
    reference = dense_projectors(family)
    for s in range(len(family)):
        p = our_projector(family, s)
        np.testing.assert_allclose(p, reference[s], atol=1e-12)
        np.testing.assert_allclose(p @ p, p, atol=1e-12)  # idempotent
        np.testing.assert_allclose(p, p.T, atol=1e-12)  # symmetric
        assert np.linalg.matrix_rank(p, tol=1e-8) == 4 * 4 * SHAPE[0]


def test_masks_cross_check_and_device_copy():
    family = DCTGridSubspaces(SHAPE, block=4, stride=3)
    g = torch.randn(9, *SHAPE, dtype=torch.float64)
    index = torch.arange(9)
    torch.testing.assert_close(family.project(g, index), family.project_via_masks(g, index))
    torch.testing.assert_close(family.to("cpu").project(g, index), family.project(g, index))


def test_bad_block_raises():
    with pytest.raises(ValueError, match="larger than the image side"):
        DCTGridSubspaces((1, 8, 8), block=9, stride=1)


def test_deepfool_margin_of_linear_model_is_analytic():
    """Two-class linear model: the margin along S is |f1 - f0| / ||P (w1 - w0)|| (x 1.02 overshoot)."""
    torch.manual_seed(0)
    family = DCTGridSubspaces((1, 8, 8), block=4, stride=2)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(64, 2)).double()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    result = SubspaceDeepFool(num_candidates=2)(linear, x, family)
    w = (linear[1].weight[1] - linear[1].weight[0]).detach().view(1, 1, 8, 8)
    with torch.no_grad():
        logits = linear(x)
    gap = (logits[:, 1] - logits[:, 0]).abs()
    for s in range(len(family)):
        pw = family.project(w, torch.tensor([s])).norm()
        torch.testing.assert_close(result.margins[s], 1.02 * gap / pw, rtol=1e-6, atol=1e-9)
    assert result.converged.all()


def test_frequency_analysis_cli_bad_input_exits_2(tmp_path, capsys):
    import frequency_analysis

    assert frequency_analysis.main(["map2d", "--checkpoint", str(tmp_path / "missing.ckpt")]) == 2
    assert frequency_analysis.main(["wavelets", "--checkpoint", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 2 and "Traceback" not in err


def test_margin_map_median_reflection_and_plot_labels():
    from analysis.maps import median_map, point_reflect, reflection_correlations
    from analysis.plots import plot_margin_maps

    family = DCTGridSubspaces((1, 28, 28), block=8, stride=4)
    margins = np.arange(36, dtype=float)[:, None] + np.array([[-1.0, 0.0, 5.0]])  # median = s
    grid = median_map(margins, family)
    assert grid[1, 2] == 8.0 and grid.shape == (6, 6)
    assert point_reflect(grid)[0, 0] == grid[5, 5] == 35.0
    corr = reflection_correlations(grid, point_reflect(grid))
    assert corr["reflected"] == pytest.approx(1.0) and corr["unreflected"] == pytest.approx(-1.0)
    fig = plot_margin_maps({"a": grid + 1}, family)
    ax, bar = fig.axes
    assert "DCT frequency index" in ax.get_xlabel() and "vertical DCT frequency index" in ax.get_ylabel()
    assert "median margin (L2" in bar.get_ylabel() and ax.images[0].norm.__class__.__name__ == "LogNorm"
