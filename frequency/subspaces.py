"""Linear subspaces of the input space and their orthogonal projectors (the paper's DCT subspaces).

A `SubspaceFamily` holds S subspaces of the space of images `[C, H, W]` and projects a batch of
vectors, each onto its own subspace: `project(g: [B, C, H, W], index: [B]) -> [B, C, H, W]`, as
`embed(coordinates(g))` with orthonormal coordinates (so `||P g|| = ||coordinates(g)||`).
The DCT block family never forms dense basis matrices: a block's basis is separable, the k DCT rows of
the block along each axis, so its coordinates are `D_h[block] g D_w[block]^T` (equivalently
`P g = IDCT(mask * DCT(g))`), with O(S * k * (H + W) + S * H * W) memory.
"""

from __future__ import annotations

import math

import torch

from frequency.dct import dct2, dct_matrix, idct2


def num_dct_blocks(size: int, block: int, step: int) -> int:
    """Number of diagonal blocks `[i, i+block)` with `i = s * step` and `i + block <= size`."""
    if block < 1 or step < 1:
        raise ValueError(f"block size and step must be positive, got block={block}, step={step}")
    if block > size:
        raise ValueError(
            f"subspace block {block}x{block} is larger than the {size}-pixel image side; use a block <= {size}"
        )
    return (size - block) // step + 1


def dct_block_masks(height: int, width: int, block: int, step: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool masks `[S, H, W]`: mask s selects DCT frequencies `[i, i+block) x [i, i+block)`, `i = s * step`."""
    count = num_dct_blocks(min(height, width), block, step)
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    starts = torch.arange(count, device=device) * step
    in_rows = (rows[None, :] >= starts[:, None]) & (rows[None, :] < starts[:, None] + block)  # [S, H]
    in_cols = (cols[None, :] >= starts[:, None]) & (cols[None, :] < starts[:, None] + block)  # [S, W]
    return in_rows[:, :, None] & in_cols[:, None, :]


class SubspaceFamily:
    """S linear subspaces of the image space `[C, H, W]`, ordered (for DCT blocks: low to high frequency)."""

    image_shape: tuple[int, int, int]

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def dims(self) -> list[int]:
        """Dimension of each subspace."""
        raise NotImplementedError

    def coordinates(self, g: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Coordinates of each `g[b]: [C, H, W]` in an orthonormal basis of subspace `index[b]`: `[B, ...]`.

        Orthonormal, so `||coordinates(g)|| = ||P g||`; `embed` maps them back to the image space.
        """
        raise NotImplementedError

    def embed(self, coords: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Images `[B, C, H, W]` with the given subspace coordinates (inverse of `coordinates` on the subspace)."""
        raise NotImplementedError

    def project(self, g: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Orthogonal projection of each `g[b]: [C, H, W]` onto subspace `index[b]`; `g: [B, C, H, W]`."""
        return self.embed(self.coordinates(g, index), index)

    def to(self, device: torch.device | str) -> SubspaceFamily:
        """This family with its tensors on `device`."""
        raise NotImplementedError

    def memory_bytes(self) -> int:
        """Bytes held by the family's tensors."""
        raise NotImplementedError

    def check_image_shape(self, shape: tuple[int, ...]) -> None:
        if tuple(shape) != tuple(self.image_shape):
            raise ValueError(
                f"subspaces were built for images of shape {tuple(self.image_shape)}, got inputs of shape "
                f"{tuple(shape)}; build the subspace family for the model's input shape"
            )


class SeparableBlockFamily(SubspaceFamily):
    """Subspaces spanned by a k x k block of 2-D DCT atoms (every channel), stored as the block's DCT matrix rows
    `rows_h: [S, k, H]`, `rows_w: [S, k, W]` (float64): coordinates `D_h[block] g D_w[block]^T`, no dense basis."""

    block: int
    image_shape: tuple[int, int, int]
    rows_h: torch.Tensor
    rows_w: torch.Tensor

    def __len__(self) -> int:
        return self.rows_h.shape[0]

    @property
    def dims(self) -> list[int]:
        return [self.block * self.block * self.image_shape[0]] * len(self)

    def coordinates(self, g: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The block's DCT coefficients `[B, C, k, k]` = `D_h[block] g D_w[block]^T` (only k rows of the DCT)."""
        rows_h, rows_w = self._rows(index, g.dtype)
        return rows_h @ g @ rows_w.transpose(-1, -2)

    def embed(self, coords: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        rows_h, rows_w = self._rows(index, coords.dtype)
        return rows_h.transpose(-1, -2) @ coords @ rows_w

    def _rows(self, index: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rows_h[index].unsqueeze(1).to(dtype), self.rows_w[index].unsqueeze(1).to(dtype)  # [B, 1, k, n]


class DCTBlockSubspaces(SeparableBlockFamily):
    """The diagonal DCT block family: subspace s spans the atoms in `[i, i+k) x [i, i+k)`, `i = s*step`,
    for every channel; dimension `k*k*C`. The paper's settings: MNIST k=8 step=1 (21), CIFAR-10 k=8 step=2
    (13), ImageNet k=16 step=16 (14)."""

    def __init__(self, image_shape: tuple[int, int, int], block: int, step: int, device: torch.device | str = "cpu"):
        channels, height, width = image_shape
        self.image_shape = (int(channels), int(height), int(width))
        self.block, self.step = int(block), int(step)
        self.masks = dct_block_masks(height, width, block, step, device)  # [S, H, W] bool
        self._set_block_rows(device)

    def _set_block_rows(self, device: torch.device | str) -> None:
        """DCT matrix rows of every block, `[S, k, H]` and `[S, k, W]` (float64): the block's basis, per axis."""
        _, height, width = self.image_shape
        starts = torch.arange(len(self)) * self.step
        offsets = starts[:, None] + torch.arange(self.block)[None, :]  # [S, k]
        self.rows_h = dct_matrix(height, torch.float64, device)[offsets.to(device)]
        self.rows_w = dct_matrix(width, torch.float64, device)[offsets.to(device)]

    def __len__(self) -> int:
        return self.masks.shape[0]

    def project_via_masks(self, g: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The same projection as `project`, as `IDCT(mask * DCT(g))` over the full DCT (a cross-check)."""
        mask = self.masks[index].unsqueeze(1).to(g.dtype)  # [B, 1, H, W], broadcast over channels
        return idct2(dct2(g) * mask)

    def to(self, device: torch.device | str) -> DCTBlockSubspaces:
        out = DCTBlockSubspaces.__new__(DCTBlockSubspaces)
        out.image_shape, out.block, out.step = self.image_shape, self.block, self.step
        out.masks = self.masks.to(device)
        out.rows_h, out.rows_w = self.rows_h.to(device), self.rows_w.to(device)
        return out

    def memory_bytes(self) -> int:
        tensors = (self.masks, self.rows_h, self.rows_w)
        return sum(t.numel() * t.element_size() for t in tensors)

    def __repr__(self) -> str:
        shape, block, step = self.image_shape, self.block, self.step
        return f"DCTBlockSubspaces(image_shape={shape}, block={block}, step={step}, count={len(self)})"


class FullSpace(SubspaceFamily):
    """The whole input space as a single subspace (plain, unconstrained DeepFool)."""

    def __init__(self, image_shape: tuple[int, int, int]):
        self.image_shape = tuple(int(v) for v in image_shape)

    def __len__(self) -> int:
        return 1

    @property
    def dims(self) -> list[int]:
        c, h, w = self.image_shape
        return [c * h * w]

    def coordinates(self, g: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return g

    def embed(self, coords: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return coords

    def to(self, device: torch.device | str) -> FullSpace:
        return self

    def memory_bytes(self) -> int:
        return 0

    def __repr__(self) -> str:
        return f"FullSpace(image_shape={self.image_shape})"


class BasisSubspaces(SubspaceFamily):
    """Subspaces given by explicit orthonormal bases `[d, m_s]` (d = C*H*W), e.g. for other experiments.

    Dense: memory is `sum_s d * m_s` floats, so prefer `DCTBlockSubspaces` for DCT blocks.
    """

    def __init__(self, bases: list[torch.Tensor], image_shape: tuple[int, int, int], check: bool = True):
        self.image_shape = tuple(int(v) for v in image_shape)
        d = self.image_shape[0] * self.image_shape[1] * self.image_shape[2]
        for s, basis in enumerate(bases):
            if basis.dim() != 2 or basis.shape[0] != d:
                raise ValueError(
                    f"basis {s} must have shape [{d}, m] for images {self.image_shape}, got {tuple(basis.shape)}"
                )
            if check:
                _check_orthonormal(basis, s)
        self.bases = list(bases)

    def __len__(self) -> int:
        return len(self.bases)

    @property
    def dims(self) -> list[int]:
        return [b.shape[1] for b in self.bases]

    def coordinates(self, g: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """`B_s^T g` zero-padded to the largest dimension: `[B, max_s m_s]`."""
        flat = g.reshape(g.shape[0], -1)
        out = flat.new_zeros(g.shape[0], max(self.dims))
        for s in index.unique().tolist():
            rows = index == s
            out[rows, : self.dims[s]] = flat[rows] @ self.bases[s].to(dtype=g.dtype, device=g.device)
        return out

    def embed(self, coords: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        out = coords.new_zeros(coords.shape[0], math.prod(self.image_shape))
        for s in index.unique().tolist():
            rows = index == s
            basis = self.bases[s].to(dtype=coords.dtype, device=coords.device)
            out[rows] = coords[rows, : self.dims[s]] @ basis.T
        return out.reshape(coords.shape[0], *self.image_shape)

    def to(self, device: torch.device | str) -> BasisSubspaces:
        return BasisSubspaces([b.to(device) for b in self.bases], self.image_shape, check=False)

    def memory_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.bases)

    def __repr__(self) -> str:
        return f"BasisSubspaces(image_shape={self.image_shape}, dims={self.dims})"


def _check_orthonormal(basis: torch.Tensor, index: int) -> None:
    gram = basis.T.double() @ basis.double()
    error = (gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)).abs().max().item()
    if error > 1e-4:
        raise ValueError(
            f"basis {index} is not orthonormal (max |B^T B - I| = {error:.2e}); orthonormalise it, e.g. with "
            "torch.linalg.qr"
        )
