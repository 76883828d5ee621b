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
from frequency.transforms import (
    FILTERS,
    dct_filter,
    flip,
    high_pass,
    high_pass_last_block,
    last_block_mask,
    low_pass,
    low_pass_mask,
    low_pass_rows_release,
    rows_mask,
)

__all__ = [
    "FILTERS",
    "BasisSubspaces",
    "DCTBlockSubspaces",
    "FullSpace",
    "SubspaceFamily",
    "dct2",
    "dct_filter",
    "dct_block_masks",
    "dct_matrix",
    "flip",
    "high_pass",
    "high_pass_last_block",
    "idct2",
    "last_block_mask",
    "low_pass",
    "low_pass_mask",
    "low_pass_rows_release",
    "num_dct_blocks",
    "rows_mask",
]
from frequency.families import FAMILY_KINDS, build_subspace_family  # noqa: E402
from frequency.grid import DCTGridSubspaces  # noqa: E402
from frequency.random_subspaces import RandomSubspaces, load_bases  # noqa: E402

__all__ += ["FAMILY_KINDS", "DCTGridSubspaces", "RandomSubspaces", "build_subspace_family", "load_bases"]
