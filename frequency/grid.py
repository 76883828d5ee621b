"""2-D grid of DCT blocks over the whole spectrum: the family behind the 2-D margin maps.

`DCTGridSubspaces(image_shape, block, stride)` holds one subspace per block position `(a, b)`: the DCT atoms whose
(row, column) frequency index lies in `[a*stride, a*stride + k) x [b*stride, b*stride + k)`, for every channel
(dimension `k*k*C`). Subspace number `s = a * grid_shape[1] + b` (row-major). Like `DCTBlockSubspaces` it never forms
dense bases: the block's basis is separable, `coords = D_h[rows] g D_w[cols]^T`. On 28x28 MNIST, 8x8 blocks with
stride 4 give a 6 x 6 grid (36 subspaces). The point reflection of the spectrum (both frequency axes reversed, the
frequency flip of the paper) maps grid position `(a, b)` to `(A-1-a, B-1-b)` exactly when `(H - k) % stride == 0`
and `(W - k) % stride == 0`.
"""

from __future__ import annotations

import torch

from frequency.dct import dct2, dct_matrix, idct2
from frequency.subspaces import SeparableBlockFamily


def grid_starts(size: int, block: int, stride: int) -> torch.Tensor:
    """First frequency index of every block along one axis: `0, stride, ...` while `start + block <= size`."""
    if block < 1 or stride < 1:
        raise ValueError(f"block and stride must be positive, got block={block}, stride={stride}")
    if block > size:
        raise ValueError(f"block {block} is larger than the image side {size}; use a block <= {size}")
    return torch.arange(0, size - block + 1, stride)


class DCTGridSubspaces(SeparableBlockFamily):
    """K x K DCT blocks on a grid of positions over the whole 2-D spectrum; subspace `s = a * cols + b`."""

    def __init__(self, image_shape: tuple[int, int, int], block: int, stride: int, device: torch.device | str = "cpu"):
        channels, height, width = (int(v) for v in image_shape)
        self.image_shape = (channels, height, width)
        self.block, self.stride = int(block), int(stride)
        self.row_starts = grid_starts(height, self.block, self.stride)  # [A]
        self.col_starts = grid_starts(width, self.block, self.stride)  # [B]
        grid_rows = self.row_starts.repeat_interleave(len(self.col_starts))  # [S]
        grid_cols = self.col_starts.repeat(len(self.row_starts))  # [S]
        offsets = torch.arange(self.block)
        self.rows_h = dct_matrix(height, torch.float64, device)[(grid_rows[:, None] + offsets).to(device)]  # [S, k, H]
        self.rows_w = dct_matrix(width, torch.float64, device)[(grid_cols[:, None] + offsets).to(device)]  # [S, k, W]

    @property
    def step(self) -> int:
        """Alias of `stride` (the name `DCTBlockSubspaces` uses)."""
        return self.stride

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(A, B): block positions along the vertical and horizontal frequency axes."""
        return len(self.row_starts), len(self.col_starts)

    @property
    def positions(self) -> list[tuple[int, int]]:
        """First (row, column) frequency index of each subspace's block, in subspace order."""
        return [(int(r), int(c)) for r in self.row_starts for c in self.col_starts]

    def masks(self) -> torch.Tensor:
        """Bool masks `[S, H, W]` of the DCT frequencies in each block."""
        _, height, width = self.image_shape
        out = torch.zeros(len(self), height, width, dtype=torch.bool)
        for s, (r, c) in enumerate(self.positions):
            out[s, r : r + self.block, c : c + self.block] = True
        return out

    def project_via_masks(self, g: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The same projection as `project`, as `IDCT(mask * DCT(g))` (a cross-check)."""
        mask = self.masks().to(g.device)[index].unsqueeze(1).to(g.dtype)
        return idct2(dct2(g) * mask)

    def to(self, device: torch.device | str) -> DCTGridSubspaces:
        out = DCTGridSubspaces.__new__(DCTGridSubspaces)
        out.image_shape, out.block, out.stride = self.image_shape, self.block, self.stride
        out.row_starts, out.col_starts = self.row_starts, self.col_starts
        out.rows_h, out.rows_w = self.rows_h.to(device), self.rows_w.to(device)
        return out

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.rows_h, self.rows_w))

    def __repr__(self) -> str:
        a, b = self.grid_shape
        shape, block, stride = self.image_shape, self.block, self.stride
        return f"DCTGridSubspaces(image_shape={shape}, block={block}, stride={stride}, grid={a}x{b})"
