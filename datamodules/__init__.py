"""LightningDataModules for MNIST, CIFAR-10, ImageNet and synthetic data, with frequency transforms of the inputs.

Every datamodule yields `(x, y)` with `x: [B, C, H, W]` in the model's input space: pixels in [0, 1], or their
frequency transform (flip or a DCT filter; see `datamodules.base`), *unnormalised*. Normalisation belongs to
the model: `dm.normalization()` returns the matching `models.normalization.Normalize`.

Low-pass quirk of the original release (REFERENCE §4): on 4-D batches its mask kept DCT rows < bandwidth of every
column (only vertical frequencies filtered), while on single images it kept the `bandwidth x bandwidth` block. We
keep the 2-D block for `low_pass`, so "low-pass CIFAR-10" here removes horizontal high frequencies too; the release's
batched behaviour is available as `transform: low_pass_rows_release` for comparisons.

`build_datamodule(dataset, **kwargs)` builds from the registry name; `dm.hparams` records `dataset` and all
constructor arguments, so `build_datamodule(**checkpoint["datamodule_hyper_parameters"])` rebuilds it.

Each DataModule is a Lightning-free data class (`MNISTData`, ..., base `FrequencyData`; registry `DATA`,
`build_data`) plus Lightning (`datamodules.modules`). The data classes are what the margin evaluation uses: they
give the same datasets, normalisation and `hparams` without importing Lightning, which `import datamodules` does
only when a DataModule name is first used (module `__getattr__`).
"""

from __future__ import annotations

import importlib
from typing import Any

from datamodules.base import (
    TRANSFORMS,
    DatasetNotFoundError,
    FrequencyData,
    FrequencyTransform,
    TensorData,
    build_from,
    split_indices,
)
from datamodules.cifar10 import CIFAR10Data
from datamodules.imagenet import ImageNetData
from datamodules.mnist import MNISTData
from datamodules.synthetic import SyntheticData

DATA: dict[str, type[FrequencyData]] = {cls.name: cls for cls in (MNISTData, CIFAR10Data, ImageNetData, SyntheticData)}
_LIGHTNING = (
    "DATASETS",
    "CIFAR10DataModule",
    "FrequencyDataModule",
    "ImageNetDataModule",
    "MNISTDataModule",
    "SyntheticDataModule",
    "TensorDataModule",
    "build_datamodule",
)


def build_data(dataset: str, **kwargs: Any) -> FrequencyData:
    """The Lightning-free data class registered as `dataset` (same names and arguments as `build_datamodule`)."""
    return build_from(DATA, dataset, kwargs)


def __getattr__(name: str) -> Any:
    """The LightningDataModules (and their registry) on first use (PEP 562): importing them imports Lightning."""
    if name in _LIGHTNING:
        value = getattr(importlib.import_module("datamodules.modules"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'datamodules' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "DATA",
    "DATASETS",
    "TRANSFORMS",
    "CIFAR10Data",
    "CIFAR10DataModule",
    "DatasetNotFoundError",
    "FrequencyData",
    "FrequencyDataModule",
    "FrequencyTransform",
    "ImageNetData",
    "ImageNetDataModule",
    "MNISTData",
    "MNISTDataModule",
    "SyntheticData",
    "SyntheticDataModule",
    "TensorData",
    "TensorDataModule",
    "build_data",
    "build_datamodule",
    "split_indices",
]
