"""Linear subspaces of the input space and their orthogonal projectors (REFERENCE §3).

A `SubspaceFamily` holds S subspaces of the space of images `[C, H, W]` and projects a batch of
vectors, each onto its own subspace: `project(g: [B, C, H, W], index: [B]) -> [B, C, H, W]`.
The DCT block family never forms basis matrices: `P g = IDCT(mask * DCT(g))`, O(S * H * W) memory.
"""

from __future__ import annotations

import torch

from frequency.dct import dct2, idct2


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

    def project(self, g: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Orthogonal projection of each `g[b]: [C, H, W]` onto subspace `index[b]`; `g: [B, C, H, W]`."""
        raise NotImplementedError

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


class DCTBlockSubspaces(SubspaceFamily):
    """The diagonal DCT block family: subspace s spans the atoms in `[i, i+k) x [i, i+k)`, `i = s*step`,
    for every channel; dimension `k*k*C`. REFERENCE settings: MNIST k=8 step=1 (21), CIFAR-10 k=8 step=2
    (13), ImageNet k=16 step=16 (14)."""

    def __init__(self, image_shape: tuple[int, int, int], block: int, step: int, device: torch.device | str = "cpu"):
        channels, height, width = image_shape
        self.image_shape = (int(channels), int(height), int(width))
        self.block, self.step = int(block), int(step)
        self.masks = dct_block_masks(height, width, block, step, device)  # [S, H, W] bool

    def __len__(self) -> int:
        return self.masks.shape[0]

    @property
    def dims(self) -> list[int]:
        return [self.block * self.block * self.image_shape[0]] * len(self)

    def project(self, g: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        mask = self.masks[index].unsqueeze(1).to(g.dtype)  # [B, 1, H, W], broadcast over channels
        return idct2(dct2(g) * mask)

    def to(self, device: torch.device | str) -> DCTBlockSubspaces:
        out = DCTBlockSubspaces.__new__(DCTBlockSubspaces)
        out.image_shape, out.block, out.step = self.image_shape, self.block, self.step
        out.masks = self.masks.to(device)
        return out

    def memory_bytes(self) -> int:
        return self.masks.numel() * self.masks.element_size()

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

    def project(self, g: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return g

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

    def project(self, g: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        flat = g.reshape(g.shape[0], -1)
        out = torch.empty_like(flat)
        for s in index.unique().tolist():
            rows = index == s
            basis = self.bases[s].to(dtype=g.dtype, device=g.device)
            out[rows] = (flat[rows] @ basis) @ basis.T
        return out.reshape(g.shape)

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
