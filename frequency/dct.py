"""Orthonormal 2-D DCT-II over the last two axes, as matrix products (exact, differentiable)."""

from __future__ import annotations

import math
from functools import lru_cache

import torch


@lru_cache(maxsize=32)
def _dct_matrix_cached(n: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)  # frequency index (rows)
    i = torch.arange(n, dtype=torch.float64).unsqueeze(0)  # sample index (columns)
    mat = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    mat[0] /= math.sqrt(2.0)
    return mat.to(dtype=dtype, device=device)


def dct_matrix(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """Orthonormal DCT-II matrix `D: [n, n]` with `D @ v` = `scipy.fft.dct(v, norm='ortho')`.

    Built in float64 and cast, cached per (n, dtype, device); do not modify the returned tensor.
    """
    return _dct_matrix_cached(int(n), dtype, str(torch.device(device)))


def _check_float(x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise TypeError(f"DCT needs a floating-point tensor, got {x.dtype}; convert with x.float() first")
    if x.dim() < 2:
        raise ValueError(f"DCT works over the last two axes [..., H, W]; got a tensor of shape {tuple(x.shape)}")


def separable_transform(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """`left @ x @ right.T` for every `[H, W]` slice of `x: [..., H, W]`, accumulated in float64.

    left: [H', H], right: [W', W] float64. Float32 sums over 224x224 images drift by ~3e-5; float64 keeps the
    result exact to the input dtype's rounding, at a small cost next to a network's backward pass. Both products
    are plain 2-D matmuls over the flattened batch (no broadcast batched matmul).
    """
    _check_float(x)
    work = x if x.dtype == torch.float64 else x.double()
    out = work @ right.T  # [..., H, W']
    out = (out.transpose(-1, -2) @ left.T).transpose(-1, -2)  # [..., H', W']
    return out.to(x.dtype)


def dct2(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal 2-D DCT-II of `x: [..., H, W]` over its last two axes; same shape and dtype."""
    _check_float(x)
    d_h = dct_matrix(x.shape[-2], torch.float64, x.device)
    d_w = dct_matrix(x.shape[-1], torch.float64, x.device)
    return separable_transform(x, d_h, d_w)


def idct2(c: torch.Tensor) -> torch.Tensor:
    """Inverse of `dct2` (orthonormal DCT-III) for `c: [..., H, W]`; same shape and dtype."""
    _check_float(c)
    d_h = dct_matrix(c.shape[-2], torch.float64, c.device)
    d_w = dct_matrix(c.shape[-1], torch.float64, c.device)
    return separable_transform(c, d_h.T, d_w.T)
