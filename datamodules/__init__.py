"""LightningDataModules for MNIST, CIFAR-10, ImageNet and synthetic data, with frequency transforms of the inputs.

Every datamodule yields `(x, y)` with `x: [B, C, H, W]` in the model's input space: pixels in [0, 1], or their
frequency transform (flip or a DCT filter; see `datamodules.base`), *unnormalised*. Normalisation belongs to
the model: `dm.normalization()` returns the matching `models.normalization.Normalize`.

Low-pass quirk of the original release: on 4-D batches its mask kept DCT rows < bandwidth of every column (only
vertical frequencies filtered), while on single images it kept the `bandwidth x bandwidth` block. We keep the 2-D
block for `low_pass`, so "low-pass CIFAR-10" here removes horizontal high frequencies too; the release's batched
behaviour is available as `transform: low_pass_rows_release` for comparisons.

`build_datamodule(dataset, **kwargs)` builds from the registry name; `dm.hparams` records `dataset` and all
constructor arguments, so `build_datamodule(**checkpoint["datamodule_hyper_parameters"])` rebuilds it.
"""

from __future__ import annotations

from typing import Any

from datamodules.base import (
    TRANSFORMS,
    DatasetNotFoundError,
    FrequencyDataModule,
    FrequencyTransform,
    TensorDataModule,
    build_from,
    split_indices,
)
from datamodules.cifar10 import CIFAR10DataModule
from datamodules.imagenet import ImageNetDataModule
from datamodules.mnist import MNISTDataModule
from datamodules.synthetic import SyntheticDataModule

DATASETS: dict[str, type[FrequencyDataModule]] = {
    cls.name: cls for cls in (MNISTDataModule, CIFAR10DataModule, ImageNetDataModule, SyntheticDataModule)
}


def build_datamodule(dataset: str, **kwargs: Any) -> FrequencyDataModule:
    """The datamodule registered as `dataset` (mnist|cifar10|imagenet|synthetic), built with `kwargs`.

    Keys starting with "_" (LightningCLI's `_class_path`, `_instantiator` in checkpoint hparams) are ignored.
    """
    return build_from(DATASETS, dataset, kwargs)


__all__ = [
    "DATASETS",
    "TRANSFORMS",
    "CIFAR10DataModule",
    "DatasetNotFoundError",
    "FrequencyDataModule",
    "FrequencyTransform",
    "ImageNetDataModule",
    "MNISTDataModule",
    "SyntheticDataModule",
    "TensorDataModule",
    "build_datamodule",
    "split_indices",
]
