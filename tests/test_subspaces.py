"""DCT block subspaces against an explicit basis built independently with scipy.

Reference: `attacks.reference.dct_block_basis`, the DCT atoms as columns `scipy.fft.idctn(e_(c,u,v))`.
Measured differences: projector matrices <= 9e-16, batched projections <= 7e-15 (float64).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attacks.reference import dct_block_basis
from frequency import BasisSubspaces, DCTBlockSubspaces, FullSpace, num_dct_blocks


def explicit_block_basis(shape: tuple[int, int, int], start: int, block: int) -> np.ndarray:
    return dct_block_basis(shape, start, block).numpy()


def projector_matrix(family, s: int) -> np.ndarray:
    """The projector of subspace s as a dense matrix, by projecting every standard basis vector."""
    d = int(np.prod(family.image_shape))
    eye = torch.eye(d, dtype=torch.float64).view(d, *family.image_shape)
    return family.project(eye, torch.full((d,), s)).reshape(d, d).numpy().T


@pytest.mark.parametrize("shape,block,step", [((1, 10, 10), 4, 2), ((3, 8, 8), 3, 1), ((2, 6, 9), 3, 3)])
def test_projection_equals_explicit_basis_projector(shape, block, step):
    family = DCTBlockSubspaces(shape, block, step)
    assert len(family) == (min(shape[1:]) - block) // step + 1
    for s in range(len(family)):
        basis = explicit_block_basis(shape, s * step, block)
        p_ref = basis @ basis.T
        p = projector_matrix(family, s)
        np.testing.assert_allclose(p, p_ref, atol=1e-14, rtol=0)
        np.testing.assert_allclose(p @ p, p, atol=1e-14, rtol=0)  # idempotent
        np.testing.assert_allclose(p, p.T, atol=1e-14, rtol=0)  # symmetric
        assert np.linalg.matrix_rank(p, tol=1e-8) == block * block * shape[0] == family.dims[s]


def test_batched_projection_uses_each_rows_own_subspace():
    shape = (3, 12, 12)
    family = DCTBlockSubspaces(shape, 4, 2)
    g = torch.randn(7, *shape, dtype=torch.float64)
    index = torch.tensor([0, 4, 2, 2, 1, 3, 0])
    out = family.project(g, index)
    for b in range(7):
        basis = explicit_block_basis(shape, int(index[b]) * 2, 4)
        ref = basis @ (basis.T @ g[b].numpy().ravel())
        np.testing.assert_allclose(out[b].numpy().ravel(), ref, atol=5e-14, rtol=0)


@pytest.mark.parametrize(
    "shape,block,step,count", [((1, 28, 28), 8, 1, 21), ((3, 32, 32), 8, 2, 13), ((3, 224, 224), 16, 16, 14)]
)
def test_paper_settings_give_the_reference_subspace_counts(shape, block, step, count):
    family = DCTBlockSubspaces(shape, block, step)
    assert len(family) == count == num_dct_blocks(shape[1], block, step)
    assert family.dims == [block * block * shape[0]] * count


def test_imagenet_family_memory_is_well_under_10_mb():
    family = DCTBlockSubspaces((3, 224, 224), 16, 16)
    assert family.memory_bytes() < 10 * 2**20
    dense_bytes = sum(family.dims) * 3 * 224 * 224 * 4  # what a dense float32 basis family would need
    assert dense_bytes > 6e9


def test_block_larger_than_image_is_rejected_with_a_clear_error():
    with pytest.raises(ValueError, match="larger than the 28-pixel image"):
        DCTBlockSubspaces((1, 28, 28), 29, 1)


def test_basis_subspaces_agree_with_dct_blocks_and_check_orthonormality():
    """Reference: the scipy basis projection `B B^T g` (BasisSubspaces is fed the same scipy bases)."""
    shape = (1, 8, 8)
    dct_family = DCTBlockSubspaces(shape, 4, 4)
    bases = [torch.from_numpy(explicit_block_basis(shape, s * 4, 4)) for s in range(len(dct_family))]
    basis_family = BasisSubspaces(bases, shape)
    g = torch.randn(4, *shape, dtype=torch.float64)
    index = torch.tensor([0, 1, 1, 0])
    expected = np.stack([bases[i].numpy() @ (bases[i].numpy().T @ g[b].numpy().ravel()) for b, i in enumerate(index)])
    np.testing.assert_allclose(basis_family.project(g, index).flatten(1).numpy(), expected, atol=5e-14, rtol=0)
    np.testing.assert_allclose(dct_family.project(g, index).flatten(1).numpy(), expected, atol=5e-14, rtol=0)
    with pytest.raises(ValueError, match="not orthonormal"):
        BasisSubspaces([2 * bases[0]], shape)
    with pytest.raises(ValueError, match="shape"):
        BasisSubspaces([bases[0][:10]], shape)


def test_full_space_is_the_identity():
    family = FullSpace((1, 5, 5))
    g = torch.randn(3, 1, 5, 5)
    assert len(family) == 1 and family.dims == [25]
    assert torch.equal(family.project(g, torch.zeros(3, dtype=torch.long)), g)


def test_wrong_image_shape_is_rejected():
    family = DCTBlockSubspaces((1, 28, 28), 8, 1)
    with pytest.raises(ValueError, match="built for images of shape"):
        family.check_image_shape((3, 32, 32))
