"""One constructor for every subspace family, by name: `build_subspace_family(kind, image_shape, ...)`.

Meant for command lines (`--subspace dct|full|grid|random|basis`): a new family is one entry here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from common.errors import InputError
from frequency.grid import DCTGridSubspaces
from frequency.random_subspaces import RandomSubspaces, load_bases
from frequency.subspaces import DCTBlockSubspaces, FullSpace, SubspaceFamily, num_dct_blocks

FAMILY_KINDS = ("dct", "full", "grid", "random", "basis")


def build_subspace_family(
    kind: str,
    image_shape: tuple[int, int, int],
    block: int | None = None,
    step: int | None = None,
    *,
    count: int | None = None,
    seed: int = 0,
    method: str = "auto",
    bases: str | Path | Sequence[str | Path] | None = None,
    device: torch.device | str = "cpu",
) -> SubspaceFamily:
    """The subspace family `kind` for images `image_shape = (C, H, W)`.

    dct: diagonal DCT blocks `block x block`, step `step` (the paper's). full: the whole space (1 subspace).
    grid: `block x block` DCT blocks on a 2-D grid with stride `step` (`DCTGridSubspaces`).
    random: `count` seeded random subspaces of the DCT blocks' dimension `block*block*C` (default count: the
    number of diagonal DCT blocks for `block`, `step`); `method` "auto" | "qr" | "hartley" (`RandomSubspaces`).
    basis: orthonormal bases from `.npy`/`.pt` files `bases` (`load_bases`).
    Raises InputError for an unknown kind or missing/invalid settings.
    """
    image_shape = tuple(int(v) for v in image_shape)
    if kind == "full":
        return FullSpace(image_shape)
    if kind == "basis":
        if bases is None:
            raise InputError("subspace kind 'basis' needs basis files (.npy/.pt of [D, k] orthonormal bases)")
        return load_bases(bases if not isinstance(bases, (str, Path)) else [bases], image_shape)
    if kind not in FAMILY_KINDS:
        raise InputError(f"unknown subspace kind {kind!r}; choose one of {', '.join(FAMILY_KINDS)}")
    if block is None or step is None:
        raise InputError(f"subspace kind {kind!r} needs a block size and a step")
    side = min(image_shape[1:])
    if not 1 <= block <= side or step < 1:
        raise InputError(f"block must be in 1..{side} and step >= 1 for images {image_shape}, got {block}, {step}")
    if kind == "dct":
        return DCTBlockSubspaces(image_shape, block, step, device)
    if kind == "grid":
        return DCTGridSubspaces(image_shape, block, step, device)
    count = count if count is not None else num_dct_blocks(side, block, step)
    return RandomSubspaces(image_shape, block * block * image_shape[0], count, seed, method, device)
