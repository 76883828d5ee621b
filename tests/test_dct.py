"""DCT toolkit and frequency transforms against scipy.fft (an independent implementation)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft as sfft
import torch

from frequency import dct2, flip, high_pass, idct2, low_pass

SHAPES = [(28, 28), (32, 32), (224, 224), (20, 36)]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def scipy_dct2(x: np.ndarray) -> np.ndarray:
    return sfft.dctn(x, axes=(-2, -1), norm="ortho")


def scipy_idct2(x: np.ndarray) -> np.ndarray:
    return sfft.idctn(x, axes=(-2, -1), norm="ortho")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("device", DEVICES)
def test_dct_matches_scipy_float32(shape, device):
    x = torch.rand(2, 3, *shape, device=device)
    ref = scipy_dct2(x.cpu().double().numpy())
    np.testing.assert_allclose(dct2(x).cpu().numpy(), ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(idct2(x).cpu().numpy(), scipy_idct2(x.cpu().double().numpy()), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_dct_matches_scipy_float64(shape):
    x = torch.randn(4, *shape, dtype=torch.float64)
    np.testing.assert_allclose(dct2(x).numpy(), scipy_dct2(x.numpy()), atol=1e-12)
    np.testing.assert_allclose(idct2(dct2(x)).numpy(), x.numpy(), atol=1e-12)


def test_dct_of_2d_tensor_and_dtype_preserved():
    x = torch.rand(6, 10, dtype=torch.float64)
    assert dct2(x).dtype == torch.float64
    np.testing.assert_allclose(dct2(x).numpy(), scipy_dct2(x.numpy()), atol=1e-12)


def test_dct_rejects_integer_and_1d_input():
    with pytest.raises(TypeError, match="floating-point"):
        dct2(torch.ones(4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="last two axes"):
        dct2(torch.ones(4))


def test_dct_gradcheck_float64():
    x = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(dct2, (x,))
    assert torch.autograd.gradcheck(idct2, (x,))


def test_flip_matches_scipy_and_is_an_orthogonal_involution():
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    ref = scipy_idct2(scipy_dct2(x.numpy())[..., ::-1, ::-1])
    np.testing.assert_allclose(flip(x).numpy(), ref, atol=1e-12)
    np.testing.assert_allclose(flip(flip(x)).numpy(), x.numpy(), atol=1e-12)
    np.testing.assert_allclose(flip(x).flatten(1).norm(dim=1).numpy(), x.flatten(1).norm(dim=1).numpy(), rtol=1e-12)
    y = torch.rand(3, 3, 32, 32, dtype=torch.float64)  # orthogonality: inner products are preserved
    assert torch.allclose((flip(x) * flip(y)).sum(), (x * y).sum(), rtol=1e-12)


def test_flip_moves_low_frequencies_to_high():
    coeffs = torch.zeros(1, 28, 28, dtype=torch.float64)
    coeffs[0, 1, 2] = 1.0
    flipped = dct2(flip(idct2(coeffs)))
    assert flipped[0, 26, 25] == pytest.approx(1.0)
    assert flipped.abs().sum() == pytest.approx(1.0)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 20, 24)])
def test_low_pass_keeps_exactly_the_block(shape):
    bandwidth = 8
    x = torch.rand(2, *shape, dtype=torch.float64)
    out = scipy_dct2(low_pass(x, bandwidth).numpy())
    full = scipy_dct2(x.numpy())
    np.testing.assert_allclose(out[..., :bandwidth, :bandwidth], full[..., :bandwidth, :bandwidth], atol=1e-12)
    outside = out.copy()
    outside[..., :bandwidth, :bandwidth] = 0
    np.testing.assert_allclose(outside, 0, atol=1e-12)
    np.testing.assert_allclose(
        low_pass(low_pass(x, bandwidth), bandwidth).numpy(), low_pass(x, bandwidth).numpy(), atol=1e-12
    )


def test_high_pass_is_the_complement_of_low_pass():
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    np.testing.assert_allclose((low_pass(x, 16) + high_pass(x, 16)).numpy(), x.numpy(), atol=1e-12)
    assert abs((low_pass(x, 16) * high_pass(x, 16)).sum().item()) < 1e-10
    np.testing.assert_allclose(scipy_dct2(high_pass(x, 16).numpy())[..., :16, :16], 0, atol=1e-12)


def test_low_pass_rejects_bad_bandwidth():
    with pytest.raises(ValueError, match="bandwidth"):
        low_pass(torch.rand(1, 8, 8), 9)
