"""Frequency transforms of images in the DCT domain (REFERENCE §4)."""

from __future__ import annotations

from functools import lru_cache

import torch

from frequency.dct import _check_float, dct2, dct_matrix, idct2, separable_transform


@lru_cache(maxsize=32)
def _flip_matrix(n: int, device: str) -> torch.Tensor:
    """`D^T J D: [n, n]` float64 (J reverses the order): flips the frequencies along one axis."""
    d = dct_matrix(n, torch.float64, device)
    return d.T @ torch.flip(d, dims=(0,))


def flip(x: torch.Tensor) -> torch.Tensor:
    """Frequency flip `IDCT(reverse(DCT(x)))` of `x: [..., H, W]`, reversing both frequency axes.

    Orthogonal and its own inverse: low frequencies become high and vice versa. Computed as one separable
    product `F_H x F_W^T` with `F = D^T J D`.
    """
    _check_float(x)
    device = str(x.device)
    return separable_transform(x, _flip_matrix(x.shape[-2], device), _flip_matrix(x.shape[-1], device))


def low_pass_mask(height: int, width: int, bandwidth: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool mask `[H, W]`, True where both DCT row and column indices are below `bandwidth`."""
    if not 0 < bandwidth <= min(height, width):
        raise ValueError(f"bandwidth must be in [1, {min(height, width)}] for {height}x{width} images, got {bandwidth}")
    rows = torch.arange(height, device=device).unsqueeze(1) < bandwidth
    cols = torch.arange(width, device=device).unsqueeze(0) < bandwidth
    return rows & cols


def low_pass(x: torch.Tensor, bandwidth: int) -> torch.Tensor:
    """Keep the `bandwidth x bandwidth` lowest-frequency DCT block of `x: [..., H, W]` (all channels).

    This is the 2-D block on every input rank. The original release, on 4-D batches, kept rows < bandwidth
    of every column (vertical frequencies only); see docs for the difference.
    """
    mask = low_pass_mask(x.shape[-2], x.shape[-1], bandwidth, x.device)
    return idct2(dct2(x) * mask)


def high_pass(x: torch.Tensor, bandwidth: int) -> torch.Tensor:
    """Remove the `bandwidth x bandwidth` lowest-frequency DCT block of `x: [..., H, W]`: `x - low_pass(x)`."""
    mask = low_pass_mask(x.shape[-2], x.shape[-1], bandwidth, x.device)
    return idct2(dct2(x) * ~mask)
