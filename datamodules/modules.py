"""The LightningDataModules: each dataset of `datamodules.{mnist,cifar10,imagenet,synthetic}` plus Lightning.

A DataModule is its Lightning-free data class (`MNISTData`, ...: transforms, normalisation, datasets) with
Lightning's hyperparameter recording (`save_hyperparameters`, which also records LightningCLI's `_class_path`),
seeded dataloaders, `setup` and `prepare_data` (downloads) on top. Importing this module imports Lightning;
`datamodules` imports it only when one of these names is used.
"""

from __future__ import annotations

from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.pytorch.core.mixins import HyperparametersMixin
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from datamodules.base import FrequencyData, TensorData, build_from
from datamodules.cifar10 import CIFAR10Data
from datamodules.imagenet import HOW_TO_GET, ImageNetData
from datamodules.mnist import MNISTData
from datamodules.synthetic import SyntheticData


class FrequencyDataModule(FrequencyData, L.LightningDataModule):
    """Base of the datamodules (LightningCLI's `--data` base class): a `FrequencyData` with Lightning's
    hyperparameters, dataloaders and `setup`. Constructor arguments: `FrequencyData`."""

    hparams = HyperparametersMixin.hparams  # Lightning's, not FrequencyData's plain record

    def _save_hparams(self, frame: FrameType | None) -> None:
        self.save_hyperparameters(frame=frame)
        self.save_hyperparameters(self._recorded_hparams(), frame=frame)

    def setup(self, stage: str | None = None) -> None:
        """Load (never download) what `stage` needs; raises DatasetNotFoundError if the files are missing."""
        if stage in (None, "fit"):
            _ = self.train_set, self.val_set
        if stage == "validate":
            _ = self.val_set
        if stage in (None, "test", "predict"):
            _ = self.test_set

    # ---- dataloaders (Lightning injects a DistributedSampler under DDP; shuffle is detected from the sampler)
    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        hp = self.hparams
        pin = torch.cuda.is_available() if hp.pin_memory is None else hp.pin_memory
        # seeded shuffle (single device; under DDP Lightning's DistributedSampler replaces it). The generator
        # advances across epochs; if loaders are rebuilt every epoch, the epoch keeps the orders distinct.
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        generator = torch.Generator().manual_seed(int(hp.seed) + 1_000_003 * epoch) if train else None
        return DataLoader(
            dataset,
            batch_size=hp.batch_size if train else (hp.eval_batch_size or hp.batch_size),
            shuffle=train,
            generator=generator,
            num_workers=hp.num_workers,
            pin_memory=pin,
            persistent_workers=hp.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)


class TensorDataModule(TensorData, FrequencyDataModule):
    """Base of the in-memory datamodules (`TensorData`)."""


class MNISTDataModule(MNISTData, TensorDataModule):
    """`MNISTData` (1x28x28 in memory, 10 classes) as a LightningDataModule; downloads with download=True."""

    def prepare_data(self) -> None:
        """Download (only with download=True) into `<data_dir>/MNIST/raw`."""
        if self.hparams.download:
            from torchvision.datasets import MNIST

            for train in (True, False):
                MNIST(root=str(self.data_path), train=train, download=True)


class CIFAR10DataModule(CIFAR10Data, TensorDataModule):
    """`CIFAR10Data` (3x32x32 in memory, 10 classes) as a LightningDataModule; downloads with download=True."""

    def prepare_data(self) -> None:
        """Download (only with download=True) into `<data_dir>/cifar-10-batches-py`."""
        if self.hparams.download:
            from torchvision.datasets import CIFAR10

            CIFAR10(root=str(self.data_path), train=True, download=True)


class ImageNetDataModule(ImageNetData, FrequencyDataModule):
    """`ImageNetData` (image folders, streamed) as a LightningDataModule; cannot download."""

    def prepare_data(self) -> None:
        if self.hparams.download:
            rank_zero_warn(f"download=True is ignored for ImageNet. {HOW_TO_GET}")


class SyntheticDataModule(SyntheticData, TensorDataModule):
    """`SyntheticData` (one discriminative direction) as a LightningDataModule."""


DATASETS: dict[str, type[FrequencyDataModule]] = {
    cls.name: cls for cls in (MNISTDataModule, CIFAR10DataModule, ImageNetDataModule, SyntheticDataModule)
}


def build_datamodule(dataset: str, **kwargs: Any) -> FrequencyDataModule:
    """The datamodule registered as `dataset` (mnist|cifar10|imagenet|synthetic), built with `kwargs`.

    Keys starting with "_" (LightningCLI's `_class_path`, `_instantiator` in checkpoint hparams) are ignored.
    """
    return build_from(DATASETS, dataset, kwargs)
