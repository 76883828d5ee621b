"""Synthetic linearly separable data with one discriminative direction (the generator of the authors' follow-up work).

`x = y * (eps / 2) * v + w` with `y = 2 * label - 1` in {-1, +1}, `v` a unit vector of shape `image_shape`, and
`w ~ N(0, sigma^2 (I - v v^T))` (Gaussian noise with its component along `v` removed), so `<x, v> = y * eps / 2`
exactly and the classes are separated by a margin of eps along `v` only.

- `direction="dct"`: `v` is the orthonormal DCT atom at frequency `direction_index = (row, col)`, placed in every
  channel and scaled by `1 / sqrt(C)` (unit norm; it lies in exactly the DCT block subspaces containing that
  frequency, as those span all channels). Default (1, 1): a low, non-constant frequency that lies only in the first
  subspace of the 8x8 / step-2 family used for 32x32 images.
- `direction="random"`: `v` is a uniformly random unit vector (Gaussian, normalised), seeded by `seed`.

Labels are exactly balanced (randomly permuted). Everything derives from `seed`: the direction, the training set and
the test set use independent derived streams. `data_dir` and `download` are unused. The frequency `transform`, if
any, is applied to the generated data like for the real datasets; `direction` stays the generator's `v` (with
`transform="flip"` the data's discriminative direction is `flip(direction)`). Normalisation uses the per-channel
mean and std of the training set (about 0 and sigma), like the filtered real datasets.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from datamodules.base import TensorDataModule, channel_stats, derived_seed
from frequency import idct2

DIRECTIONS = ("dct", "random")
_STREAM_DIRECTION, _STREAM_TRAIN, _STREAM_TEST = 0, 1, 2


def dct_atom(image_shape: tuple[int, int, int], row: int, col: int) -> torch.Tensor:
    """Unit-norm `[C, H, W]`: the orthonormal DCT atom (row, col) in every channel, scaled by 1/sqrt(C)."""
    channels, height, width = image_shape
    if not (0 <= row < height and 0 <= col < width):
        raise ValueError(f"direction_index ({row}, {col}) is outside the {height}x{width} DCT grid")
    coeff = torch.zeros(channels, height, width, dtype=torch.float64)
    coeff[:, row, col] = 1.0 / math.sqrt(channels)
    return idct2(coeff)


def random_direction(image_shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """Uniformly random unit vector `[C, H, W]` (float64), deterministic in `seed`."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(image_shape, generator=g, dtype=torch.float64)
    return v / v.norm()


def generate(n: int, v: torch.Tensor, eps: float, sigma: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` samples `x = y * eps/2 * v + w`: x [n, *v.shape] float32, labels [n] int64 in {0, 1} (balanced)."""
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % 2)[torch.randperm(n, generator=g)]
    v64 = v.double().flatten()
    w = sigma * torch.randn(n, v64.numel(), generator=g, dtype=torch.float64)
    w -= (w @ v64)[:, None] * v64[None, :]  # remove the component along v
    y = (2 * labels - 1).double()
    x = (y[:, None] * (eps / 2.0)) * v64[None, :] + w
    return x.float().reshape(n, *v.shape), labels.long()


class SyntheticDataModule(TensorDataModule):
    """Synthetic two-class data of `image_shape` (module docstring); `direction: [C, H, W]` is the unit vector v.

    Subspaces: 8x8 DCT blocks with step 2 (the CIFAR-10 setting, 13 subspaces for 32x32); for images with a side
    below 32 the block is min(8, side) with step 1.
    """

    name = "synthetic"

    def __init__(
        self,
        data_dir: str = "data",
        image_shape: tuple[int, int, int] = (1, 32, 32),
        eps: float = 1.0,
        sigma: float = 3.0,
        num_train: int = 10000,
        num_test: int = 2000,
        direction: str = "dct",
        direction_index: tuple[int, int] = (1, 1),
        **kwargs: Any,
    ):
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {image_shape}")
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {direction!r}; choose one of {', '.join(DIRECTIONS)}")
        if num_train < 2 or num_test < 2 or sigma < 0 or eps < 0:
            raise ValueError(
                f"need num_train, num_test >= 2 and eps, sigma >= 0; got num_train={num_train}, "
                f"num_test={num_test}, eps={eps}, sigma={sigma}"
            )
        super().__init__(data_dir=data_dir, **kwargs)  # FrequencyDataModule arguments
        shape = self.image_shape
        if direction == "dct":
            row, col = (int(i) for i in direction_index)
            v = dct_atom(shape, row, col)
        else:
            v = random_direction(shape, derived_seed(self.hparams.seed, _STREAM_DIRECTION))
        self.direction: torch.Tensor = v.float()  # [C, H, W], unit norm (the hparam `direction` is the kind)
        self._direction64 = v

    def _canonical_hparams(self, hparams: dict[str, Any]) -> dict[str, Any]:
        for key in ("image_shape", "direction_index"):
            hparams[key] = tuple(int(v) for v in hparams[key])
        return hparams

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.hparams.image_shape

    @property
    def num_classes(self) -> int:
        return 2

    @property
    def subspace_block(self) -> int:
        return min(8, *self.image_shape[1:])

    @property
    def subspace_step(self) -> int:
        return 2 if min(self.image_shape[1:]) >= 32 else 1

    def _normalization_stats(self) -> tuple[list[float], list[float]]:
        return channel_stats(self.train_tensors[0])

    def _load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        hp = self.hparams
        n = hp.num_train if train else hp.num_test
        stream = _STREAM_TRAIN if train else _STREAM_TEST
        return generate(n, self._direction64, hp.eps, hp.sigma, derived_seed(hp.seed, stream))
