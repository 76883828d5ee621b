"""Subspace coordinates of input gradients taken at the model's first convolution (the stem) instead of its input.

DeepFool needs each candidate gradient only through its subspace coordinates `B_s^T w` (orthonormal basis
`B_s: [D_in, m]`). When every path from the logits back to the input goes through a first convolution
`h = conv(L x)` (`L`: the input normalisation `x -> (x - mean) / std`, or nothing), the chain rule gives
`B_s^T w = (conv L B_s)^T dlogit/dh`. So the backward pass can stop at `h` and one matmul with the fixed
matrix `Q_s = conv(L B_s): [m, D_h]` (the m basis images through the stem, no bias) replaces the stem's
backward and the projection. For LeNet on MNIST (stem 1 -> 6 channels 5x5 at 28x28, m = 64) that matmul is
5x faster than the stem's native backward on a CPU: 4704 x 64 multiply-adds per gradient at GEMM speed.

`attacks/kernels/graph.py: split_stem` finds such a stem on the model's graph (statically: the input's only user
chain is `Normalize` then a plain convolution). `StemProjection` holds the `Q_s` of one stem and one subspace
family and turns gradients at `h` into coordinates, grouped by subspace.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attacks.kernels.graph import StemSplit
from frequency.subspaces import SubspaceFamily

# Where the shortcut pays (measured on CPU, 1 thread, 9 gradients of 50-160 images): PyTorch's native backward
# of a stem with few output channels is slow (LeNet's 1 -> 6 channels 5x5: 46 ms against 16 ms for the matmuls),
# while a 64-channel stem (ResNet-18-MNIST's 7x7) runs near GEMM speed (15.6 ms against 15.8 ms: no gain).
MAX_OUT_CHANNELS = 16  # the stem has at most this many output channels
MAX_COST_RATIO = 4  # m <= this x the stem's taps per output (C_in / groups * kh * kw)
MAX_BYTES = 256 * 2**20  # all Q_s together take at most this much memory


class StemProjection:
    """`Q_s: [S, D_h, m]` for one stem and one subspace family; `plan(...)` turns gradients at the stem's output
    into the subspace coordinates of the matching input gradients. Build with `StemProjection.build`."""

    def __init__(
        self,
        split: StemSplit,
        subspaces: SubspaceFamily,
        image_shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.conv, self.scale = split.conv, split.scale
        zero, first = torch.zeros((1, *image_shape), dtype=dtype, device=device), torch.zeros(1, dtype=torch.long)
        self.coordinate_shape = tuple(subspaces.coordinates(zero, first.to(device)).shape[1:])
        dim = int(torch.Size(self.coordinate_shape).numel())
        eye = torch.eye(dim, dtype=dtype, device=device).view(dim, *self.coordinate_shape)
        matrices = []
        with torch.no_grad():
            for s in range(len(subspaces)):
                basis = subspaces.embed(eye, torch.full((dim,), s, dtype=torch.long, device=device))  # [m, C, H, W]
                matrices.append(self._linear_stem(basis).flatten(1).t().contiguous())  # [D_h, m]
        self.matrices = torch.stack(matrices)  # [S, D_h, m]
        self._buffer: torch.Tensor | None = None

    @classmethod
    def build(
        cls,
        split: StemSplit,
        subspaces: SubspaceFamily,
        image_shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
    ) -> StemProjection | None:
        """The projection where it saves work, else None: CPU only, equal subspace dimensions, at most
        `MAX_OUT_CHANNELS` stem channels, `m` at most `MAX_COST_RATIO` x the stem's taps per output, and all `Q_s`
        within `MAX_BYTES`."""
        dims, conv = set(subspaces.dims), split.conv
        if torch.device(device).type != "cpu" or len(dims) != 1 or conv.out_channels > MAX_OUT_CHANNELS:
            return None
        (dim,) = dims
        taps = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
        with torch.no_grad():
            outputs = conv(torch.zeros((1, *image_shape), dtype=dtype, device=device)).numel()
        size = len(subspaces) * dim * outputs * torch.empty((), dtype=dtype).element_size()
        if dim > MAX_COST_RATIO * taps or size > MAX_BYTES:
            return None
        return cls(split, subspaces, image_shape, dtype, device)

    def _linear_stem(self, images: torch.Tensor) -> torch.Tensor:
        """The stem's linear part on `images: [B, C, H, W]`: `conv(images / scale)` without bias."""
        if self.scale is not None:
            images = images / self.scale.to(images.dtype)
        conv = self.conv
        weight = conv.weight.detach().to(images.dtype)
        return F.conv2d(images, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)

    def plan(self, row_sample: torch.Tensor | None, row_subspace: torch.Tensor, num_grads: int) -> StemCoordinates:
        """Coordinates for rows r of point `row_sample[r]` (None: point r) along subspace `row_subspace[r]`, from
        gradients added one at a time (`StemCoordinates.add`) into a buffer reused across passes."""
        return StemCoordinates(self, row_sample, row_subspace, num_grads)

    def buffer(self, num_points: int, num_grads: int, like: torch.Tensor) -> torch.Tensor:
        """`[num_points, num_grads, D_h]` scratch space for stem gradients, kept between passes (fresh memory
        costs page faults: measured 0.2-0.4 s per LeNet run)."""
        size = (num_points, num_grads, like[0].numel())
        if self._buffer is None or self._buffer.shape[0] < num_points or self._buffer.shape[1:] != size[1:]:
            self._buffer = torch.empty(size, dtype=like.dtype, device=like.device)
        return self._buffer[:num_points]


class StemCoordinates:
    """Subspace coordinates `[R, K, *coordinate shape]` from K gradients at the stem, each `[N, C_out, H', W']`,
    added one at a time. The gradients are copied into a buffer `[N, K, D_h]`; `result()` then does one matmul per
    subspace, `[n_s * K, D_h] @ Q_s`, so each `Q_s` is read once per pass. Rows of a subspace are a slice of the
    buffer where they are consecutive (the engine sorts its pool by subspace); with `row_sample`, every point's
    coordinates are computed and rows pick theirs."""

    def __init__(
        self, projection: StemProjection, row_sample: torch.Tensor | None, row_subspace: torch.Tensor, num_grads: int
    ):
        self.projection, self.row_sample, self.row_subspace = projection, row_sample, row_subspace
        self.num_grads, self.grads = num_grads, None

    def add(self, k: int, grad: torch.Tensor) -> None:
        """Gradient k at the stem, `[N, C_out, H', W']`."""
        if self.grads is None:
            self.grads = self.projection.buffer(grad.shape[0], self.num_grads, grad)
        self.grads[:, k].copy_(grad.flatten(1))

    def result(self) -> torch.Tensor:
        matrices, grads, num_grads = self.projection.matrices, self.grads, self.num_grads
        num_rows, dim = self.row_subspace.numel(), matrices.shape[2]
        out = torch.empty((num_rows, num_grads, dim), dtype=grads.dtype, device=grads.device)
        order = torch.argsort(self.row_subspace, stable=True)
        subspaces, counts = torch.unique_consecutive(self.row_subspace[order], return_counts=True)
        for s, rows in zip(subspaces.tolist(), order.split(counts.tolist()), strict=True):
            first, last = int(rows[0]), int(rows[-1])
            if self.row_sample is not None:
                coords = (grads.flatten(0, 1) @ matrices[s]).view(grads.shape[0], num_grads, dim)
                out[rows] = coords[self.row_sample[rows]]
            elif last - first == rows.numel() - 1:  # consecutive rows: no copies
                torch.mm(grads[first : last + 1].flatten(0, 1), matrices[s], out=out[first : last + 1].flatten(0, 1))
            else:
                out[rows] = (grads[rows].flatten(0, 1) @ matrices[s]).view(-1, num_grads, dim)
        return out.unflatten(2, self.projection.coordinate_shape)
