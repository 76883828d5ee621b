"""Frequency transforms of images in the DCT domain (the paper's frequency flip and filters).

Filters keep the DCT coefficients of `x: [..., H, W]` where a bool mask `[H, W]` is True (every channel and batch
item alike) and transform back: `IDCT(mask * DCT(x))`. Row index = vertical frequency, column = horizontal.

- `low_pass`: keep the lowest `b x b` block (rows < b and columns < b); the paper's low-pass (the default).
- `low_pass_rows_release`: keep rows < b of every column (only the vertical frequency filtered), what the
  original release's mask did on 4-D batches; for comparisons with it.
- `high_pass`: remove the lowest `b x b` block (`x - low_pass(x)`); a supplementary high-pass of the paper.
- `high_pass_last_block`: keep only the highest `b x b` block (rows >= H - b and columns >= W - b); the paper's
  other supplementary high-pass.
"""

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


def _check_bandwidth(height: int, width: int, bandwidth: int) -> None:
    if not 0 < bandwidth <= min(height, width):
        raise ValueError(f"bandwidth must be in [1, {min(height, width)}] for {height}x{width} images, got {bandwidth}")


def low_pass_mask(height: int, width: int, bandwidth: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool mask `[H, W]`, True where both DCT row and column indices are below `bandwidth`."""
    _check_bandwidth(height, width, bandwidth)
    rows = torch.arange(height, device=device).unsqueeze(1) < bandwidth
    cols = torch.arange(width, device=device).unsqueeze(0) < bandwidth
    return rows & cols


def rows_mask(height: int, width: int, bandwidth: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool mask `[H, W]`, True where the DCT row (vertical frequency) index is below `bandwidth`, any column."""
    _check_bandwidth(height, width, bandwidth)
    return (torch.arange(height, device=device).unsqueeze(1) < bandwidth).expand(height, width)


def last_block_mask(height: int, width: int, bandwidth: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool mask `[H, W]`, True on the highest-frequency block: row >= H - bandwidth and column >= W - bandwidth."""
    _check_bandwidth(height, width, bandwidth)
    rows = torch.arange(height, device=device).unsqueeze(1) >= height - bandwidth
    cols = torch.arange(width, device=device).unsqueeze(0) >= width - bandwidth
    return rows & cols


def dct_filter(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`IDCT(mask * DCT(x))` for `x: [..., H, W]` and a bool `mask: [H, W]`; same shape and dtype."""
    return idct2(dct2(x) * mask)


def low_pass(x: torch.Tensor, bandwidth: int) -> torch.Tensor:
    """Keep the `bandwidth x bandwidth` lowest-frequency DCT block of `x: [..., H, W]` (all channels).

    The 2-D block on every input rank. The original release, on 4-D batches, kept rows < bandwidth of every
    column instead: that is `low_pass_rows_release`.
    """
    return dct_filter(x, low_pass_mask(x.shape[-2], x.shape[-1], bandwidth, x.device))


def low_pass_rows_release(x: torch.Tensor, bandwidth: int) -> torch.Tensor:
    """The release's batched low-pass: keep DCT rows < `bandwidth` of every column of `x: [..., H, W]`.

    Only the vertical frequency is filtered; horizontal high frequencies pass. For comparisons with the release.
    """
    return dct_filter(x, rows_mask(x.shape[-2], x.shape[-1], bandwidth, x.device))


def high_pass(x: torch.Tensor, bandwidth: int) -> torch.Tensor:
    """Remove the `bandwidth x bandwidth` lowest-frequency DCT block of `x: [..., H, W]`: `x - low_pass(x)`."""
    return dct_filter(x, ~low_pass_mask(x.shape[-2], x.shape[-1], bandwidth, x.device))


def high_pass_last_block(x: torch.Tensor, bandwidth: int) -> torch.Tensor:
    """Keep only the `bandwidth x bandwidth` highest-frequency DCT block of `x: [..., H, W]` (all channels)."""
    return dct_filter(x, last_block_mask(x.shape[-2], x.shape[-1], bandwidth, x.device))


FILTERS = {
    "low_pass": low_pass,
    "low_pass_rows_release": low_pass_rows_release,
    "high_pass": high_pass,
    "high_pass_last_block": high_pass_last_block,
}
"""The DCT filters by name: `fn(x: [..., H, W], bandwidth) -> same shape`."""
