"""Control subspaces: seeded random orthonormal subspaces, and user-given bases checked for orthonormality.

`RandomSubspaces(image_shape, dim, count, seed, method)`: `count` random subspaces of dimension `dim` of the image
space (D = C*H*W), subspace s drawn from its own seed `SeedSequence([seed, s])` (so subspace s does not depend on
`count`). Two generators, chosen by `method`:

- "qr": exact Haar-random subspaces, the Q factor of the QR decomposition of a Gaussian [D, dim] matrix (float64,
  CPU generator). Dense: `count * D * dim` floats (MNIST, dim 64: 0.4 MB per subspace) - fine for small images.
- "hartley": a structured random orthogonal transform, `R = H S2 Pi H S1` on the flattened image, where H is the
  orthonormal discrete Hartley transform (real, symmetric, its own inverse; via FFT), S1, S2 random sign flips and
  Pi a random permutation; subspace s is spanned by the rows of R at `dim` random positions. Nothing dense is kept
  (O(D) integers per subspace: about 1.5 MB for ImageNet's D = 150528, against 460 MB for a dense [D, 768] basis);
  applying it costs two FFTs of length D per vector. Each basis vector is a sign-scrambled Hartley wave, whose
  energy is spread over the whole spectrum like a Haar-random vector's (tested against "qr").
- "auto" (default): "qr" when the dense bases take at most 256 MB, else "hartley".

`load_bases(paths, image_shape)`: user bases from `.pt`/`.npy` files holding [D, k], [S, D, k] or (`.pt`) a list
of [D, k] tensors; shapes and orthonormality (max |B^T B - I| <= 1e-4) are checked with a one-line `InputError`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from common.errors import InputError
from frequency.subspaces import BasisSubspaces, SubspaceFamily

DENSE_LIMIT_BYTES = 256 * 2**20
ORTHONORMAL_TOLERANCE = 1e-4


def subspace_generator(seed: int, index: int) -> torch.Generator:
    """CPU generator of subspace `index` of a family drawn with `seed` (independent of the family's size)."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def haar_basis(dim_total: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """Orthonormal [D, dim] float64 basis of a Haar-random subspace (QR of a Gaussian matrix, sign-fixed). The QR
    runs on one CPU thread: LAPACK's blocked QR splits its sums by thread, so the bits (and the family's digest, which
    a resume checks) would otherwise depend on the process's thread count."""
    gaussian = torch.randn(dim_total, dim, generator=generator, dtype=torch.float64)
    with _one_thread():
        q, r = torch.linalg.qr(gaussian)
    return q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)[None, :]


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """torch's CPU intra-op threads set to 1 inside the block, restored after."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def hartley(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal discrete Hartley transform along the last axis (real, symmetric, its own inverse)."""
    spectrum = torch.fft.fft(x, dim=-1, norm="ortho")
    return spectrum.real - spectrum.imag


class RandomSubspaces(SubspaceFamily):
    """`count` seeded random orthonormal subspaces of dimension `dim` (see the module docstring for `method`)."""

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        dim: int,
        count: int,
        seed: int = 0,
        method: str = "auto",
        device: torch.device | str = "cpu",
    ):
        self.image_shape = tuple(int(v) for v in image_shape)
        total = math.prod(self.image_shape)
        if not 1 <= dim <= total or count < 1:
            raise InputError(f"random subspaces need 1 <= dim <= {total} and count >= 1, got dim={dim}, count={count}")
        if method == "auto":
            method = "qr" if count * total * dim * 8 <= DENSE_LIMIT_BYTES else "hartley"
        if method not in ("qr", "hartley"):
            raise InputError(f"random subspace method must be 'auto', 'qr' or 'hartley', got {method!r}")
        self.dim, self.count, self.seed, self.method = int(dim), int(count), int(seed), method
        generators = [subspace_generator(seed, s) for s in range(count)]
        if method == "qr":
            self.bases = torch.stack([haar_basis(total, dim, g) for g in generators]).to(device)  # [S, D, k]
        else:
            self.signs1, self.perms, self.signs2, self.selects = (
                torch.stack(t).to(device) for t in zip(*(_hartley_draw(total, dim, g) for g in generators))
            )

    def __len__(self) -> int:
        return self.count

    @property
    def dims(self) -> list[int]:
        return [self.dim] * self.count

    def coordinates(self, g: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Coordinates `[B, dim]` of `g: [B, C, H, W]` in subspace `index[b]`'s orthonormal basis."""
        flat = g.reshape(g.shape[0], -1)
        out = flat.new_empty(g.shape[0], self.dim)
        for s in index.unique().tolist():
            rows = index == s
            out[rows] = self._forward(flat[rows], s)
        return out

    def embed(self, coords: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        out = coords.new_empty(coords.shape[0], math.prod(self.image_shape))
        for s in index.unique().tolist():
            rows = index == s
            out[rows] = self._backward(coords[rows], s)
        return out.view(coords.shape[0], *self.image_shape)

    def _forward(self, flat: torch.Tensor, s: int) -> torch.Tensor:
        if self.method == "qr":
            return flat @ self.bases[s].to(flat.dtype)
        t = hartley(flat * self.signs1[s].to(flat.dtype))[:, self.perms[s]]
        return hartley(t * self.signs2[s].to(flat.dtype))[:, self.selects[s]]

    def _backward(self, coords: torch.Tensor, s: int) -> torch.Tensor:
        if self.method == "qr":
            return coords @ self.bases[s].to(coords.dtype).T
        y = coords.new_zeros(coords.shape[0], math.prod(self.image_shape))
        y[:, self.selects[s]] = coords
        y = hartley(y) * self.signs2[s].to(coords.dtype)
        z = torch.empty_like(y)
        z[:, self.perms[s]] = y
        return hartley(z) * self.signs1[s].to(coords.dtype)

    def basis(self, s: int) -> torch.Tensor:
        """Dense orthonormal basis `[D, dim]` of subspace s (float64; for checks and small images only)."""
        eye = torch.eye(self.dim, dtype=torch.float64, device=self._device())
        return self.embed(eye, torch.full((self.dim,), s, device=eye.device)).reshape(self.dim, -1).T

    def _device(self) -> torch.device:
        return self.bases.device if self.method == "qr" else self.perms.device

    def to(self, device: torch.device | str) -> RandomSubspaces:
        out = RandomSubspaces.__new__(RandomSubspaces)
        out.__dict__.update(self.__dict__)
        for name in ("bases", "signs1", "perms", "signs2", "selects"):
            if hasattr(self, name):
                setattr(out, name, getattr(self, name).to(device))
        return out

    def memory_bytes(self) -> int:
        names = ("bases",) if self.method == "qr" else ("signs1", "perms", "signs2", "selects")
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in names)

    def __repr__(self) -> str:
        return (
            f"RandomSubspaces(image_shape={self.image_shape}, dim={self.dim}, count={self.count}, seed={self.seed}, "
            f"method={self.method!r})"
        )


def _hartley_draw(total: int, dim: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Signs S1 [D] int8, permutation Pi [D], signs S2 [D] int8 and the `dim` selected rows [dim] of one subspace."""
    signs1 = torch.randint(0, 2, (total,), generator=generator, dtype=torch.int8) * 2 - 1
    perm = torch.randperm(total, generator=generator)
    signs2 = torch.randint(0, 2, (total,), generator=generator, dtype=torch.int8) * 2 - 1
    select = torch.randperm(total, generator=generator)[:dim]
    return signs1, perm, signs2, select


# ---- user-given bases ----------------------------------------------------------------------------------------
def load_bases(paths: str | Path | list[str | Path], image_shape: tuple[int, int, int]) -> BasisSubspaces:
    """Subspaces from `.npy`/`.pt` files of orthonormal bases: each file holds [D, k], [S, D, k] or (`.pt`) a list
    of [D, k]; D must be C*H*W of `image_shape`. Raises InputError naming the file and the fix."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise InputError("no basis files given; pass one or more .npy/.pt files of [D, k] orthonormal bases")
    bases = [basis for path in paths for basis in _read_bases(Path(path))]
    total = math.prod(image_shape)
    for i, (path, basis) in enumerate(bases):
        check_orthonormal_basis(basis, total, f"{path} (basis {i})")
    return BasisSubspaces([b.double() for _, b in bases], tuple(image_shape), check=False)


def check_orthonormal_basis(basis: torch.Tensor, total: int, name: str) -> None:
    """InputError unless `basis` is [total, k] with k <= total and orthonormal columns (|B^T B - I| <= 1e-4)."""
    if basis.dim() != 2 or basis.shape[0] != total or not 1 <= basis.shape[1] <= total:
        raise InputError(f"{name} has shape {tuple(basis.shape)}; a basis must be [D={total}, k] with 1 <= k <= D")
    gram = basis.T.double() @ basis.double()
    error = (gram - torch.eye(gram.shape[0], dtype=torch.float64)).abs().max().item()
    if not math.isfinite(error) or error > ORTHONORMAL_TOLERANCE:
        raise InputError(
            f"{name} is not orthonormal (max |B^T B - I| = {error:.2e} > {ORTHONORMAL_TOLERANCE:g}); "
            "orthonormalise its columns, e.g. with torch.linalg.qr(B).Q"
        )


def _read_bases(path: Path) -> list[tuple[Path, torch.Tensor]]:
    if not path.is_file():
        raise InputError(f"basis file {path} does not exist; give .npy or .pt files of [D, k] bases")
    try:
        if path.suffix == ".npy":
            data = torch.from_numpy(np.load(path, allow_pickle=False))
        elif path.suffix == ".pt":
            data = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise InputError(f"basis file {path} must end in .npy or .pt")
    except (OSError, ValueError, RuntimeError, EOFError) as err:
        raise InputError(f"cannot read basis file {path} ({' '.join(str(err).split())}); save [D, k] arrays") from err
    items = list(data) if isinstance(data, (list, tuple)) else [data]
    out = []
    for item in items:
        tensor = torch.as_tensor(item) if not isinstance(item, torch.Tensor) else item
        if not tensor.is_floating_point():
            raise InputError(f"basis file {path} holds {tensor.dtype} values; bases must be floating point")
        out += [(path, b) for b in (tensor.unbind(0) if tensor.dim() == 3 else [tensor])]
    return out
