"""Frequency transforms against an independent dense-matrix construction.

Reference: the 1-D orthonormal DCT matrix `D_n = scipy.fft.dct(I_n, axis=0, norm="ortho")`, the 2-D DCT of a
row-major flattened `[H, W]` image as the Kronecker product `K = D_H (x) D_W`, a filter as `K^T diag(m) K` with the
mask `m` written out from the paper's definition, and the flip as `K^T R K` (R reverses the flattened
coefficients, i.e. both frequency axes). Measured differences: <= 1.1e-14 (float64), <= 7.4e-8 (float32 outputs
of [0, 1] pixels).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft as sfft
import torch

from datamodules import TRANSFORMS, FrequencyTransform
from frequency import FILTERS, flip, high_pass, high_pass_last_block, low_pass, low_pass_rows_release

SHAPES = [(28, 28), (32, 32), (20, 24)]


def dense_dct(height: int, width: int) -> np.ndarray:
    """`K: [H*W, H*W]`, the orthonormal 2-D DCT-II of a row-major flattened image."""
    return np.kron(sfft.dct(np.eye(height), axis=0, norm="ortho"), sfft.dct(np.eye(width), axis=0, norm="ortho"))


def paper_mask(kind: str, height: int, width: int, b: int) -> np.ndarray:
    """Kept DCT coefficients `[H, W]` (row = vertical frequency), written from the definitions one index at a time."""
    keep = {
        "low_pass": lambda r, c: r < b and c < b,
        "low_pass_rows_release": lambda r, c: r < b,
        "high_pass": lambda r, c: not (r < b and c < b),
        "high_pass_last_block": lambda r, c: r >= height - b and c >= width - b,
    }[kind]
    return np.array([[keep(r, c) for c in range(width)] for r in range(height)], dtype=np.float64)


def dense_filter(kind: str, height: int, width: int, b: int) -> np.ndarray:
    k = dense_dct(height, width)
    return k.T @ np.diag(paper_mask(kind, height, width, b).ravel()) @ k


def apply_dense(op: np.ndarray, x: np.ndarray) -> np.ndarray:
    """`op` applied to every `[H, W]` slice of `x: [..., H, W]`."""
    flat = x.reshape(-1, x.shape[-2] * x.shape[-1])
    return (flat @ op.T).reshape(x.shape)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", list(FILTERS))
def test_filters_match_dense_matrices(kind, shape):
    """Reference: K^T diag(m) K (module docstring), float64; measured <= 1.1e-14."""
    b = 8
    x = torch.rand(2, 3, *shape, dtype=torch.float64)
    expected = apply_dense(dense_filter(kind, *shape, b), x.numpy())
    np.testing.assert_allclose(FILTERS[kind](x, b).numpy(), expected, atol=5e-14, rtol=0)


@pytest.mark.parametrize("kind", list(FILTERS))
def test_filters_in_float32_and_on_single_images(kind):
    """Reference: the dense float64 operator; float32 output is its rounding (measured <= 7.4e-8 on [0, 1] pixels).

    Single images `[H, W]` and `[C, H, W]` get the same mask as batches (the release differed here for low-pass).
    """
    x = torch.rand(4, 1, 28, 28)
    expected = apply_dense(dense_filter(kind, 28, 28, 16), x.double().numpy())
    out = FILTERS[kind](x, 16)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), expected, atol=2e-7, rtol=0)
    np.testing.assert_allclose(FILTERS[kind](x[0, 0], 16).numpy(), expected[0, 0], atol=2e-7, rtol=0)
    np.testing.assert_allclose(FILTERS[kind](x[1], 16).numpy(), expected[1], atol=2e-7, rtol=0)


def test_flip_matches_the_dense_matrix():
    """Reference: K^T R K with R the reversal permutation of the flattened coefficients."""
    k = dense_dct(20, 24)
    op = k.T @ np.eye(20 * 24)[::-1] @ k
    x = torch.rand(3, 20, 24, dtype=torch.float64)
    np.testing.assert_allclose(flip(x).numpy(), apply_dense(op, x.numpy()), atol=5e-14, rtol=0)


def test_the_two_high_passes_and_the_two_low_passes_differ_as_documented():
    """Reference: closed forms. high_pass = x - low_pass; the last block is inside high_pass's passband; the rows
    low-pass passes the horizontal frequency a 2-D block removes."""
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    np.testing.assert_allclose((low_pass(x, 16) + high_pass(x, 16)).numpy(), x.numpy(), atol=5e-14, rtol=0)
    last = high_pass_last_block(x, 8)
    np.testing.assert_allclose(high_pass(last, 8).numpy(), last.numpy(), atol=5e-14, rtol=0)
    assert (high_pass(x, 8) - last).norm() > 0.1 * x.norm()  # removing the first block is not keeping the last
    horizontal = torch.cos(torch.pi * (2 * torch.arange(32.0, dtype=torch.float64) + 1) * 20 / 64).expand(32, 32)
    assert low_pass_rows_release(horizontal, 16).norm() == pytest.approx(horizontal.norm().item(), rel=1e-14)
    assert low_pass(horizontal, 16).norm() < 1e-12


@pytest.mark.parametrize("kind", [t for t in TRANSFORMS if t != "none"])
def test_datamodule_transform_applies_the_named_operator(kind):
    """Reference: the dense operators above, through the datamodules' picklable FrequencyTransform."""
    x = torch.rand(5, 3, 32, 32, dtype=torch.float64)
    k = dense_dct(32, 32)
    op = k.T @ np.eye(32 * 32)[::-1] @ k if kind == "flip" else dense_filter(kind, 32, 32, 16)
    transform = FrequencyTransform(kind, bandwidth=16)
    np.testing.assert_allclose(transform(x).numpy(), apply_dense(op, x.numpy()), atol=5e-14, rtol=0)
    assert kind in repr(transform)


def test_filters_reject_a_bandwidth_larger_than_the_image():
    for fn in FILTERS.values():
        with pytest.raises(ValueError, match="bandwidth"):
            fn(torch.rand(1, 8, 8), 9)
