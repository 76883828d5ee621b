"""Frequency toolkit: orthonormal 2-D DCT, frequency transforms and DCT subspaces (pure PyTorch)."""

from frequency.dct import dct2, dct_matrix, idct2
from frequency.subspaces import (
    BasisSubspaces,
    DCTBlockSubspaces,
    FullSpace,
    SubspaceFamily,
    dct_block_masks,
    num_dct_blocks,
)
from frequency.transforms import flip, high_pass, low_pass, low_pass_mask

__all__ = [
    "BasisSubspaces",
    "DCTBlockSubspaces",
    "FullSpace",
    "SubspaceFamily",
    "dct2",
    "dct_block_masks",
    "dct_matrix",
    "flip",
    "high_pass",
    "idct2",
    "low_pass",
    "low_pass_mask",
    "num_dct_blocks",
]
from frequency.families import FAMILY_KINDS, build_subspace_family  # noqa: E402
from frequency.grid import DCTGridSubspaces  # noqa: E402
from frequency.random_subspaces import RandomSubspaces, load_bases  # noqa: E402

__all__ += ["FAMILY_KINDS", "DCTGridSubspaces", "RandomSubspaces", "build_subspace_family", "load_bases"]
