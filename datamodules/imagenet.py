"""ImageNet from image-folder trees, streamed; the frequency transform is applied on the fly after crop and ToTensor.

Layout: `<data_dir>/train/<class>/*.JPEG` and `<data_dir>/val/<class>/*` (the validation images sorted into class
folders, e.g. with the common `valprep.sh`). Class indices come from the sorted class folders of `train/` (or of
`val/` when there is no `train/`, for evaluation-only use), and `val/` uses the same mapping.

Normalisation: the standard ImageNet constants for every transform; with flip or a DCT filter the mean image
is the transform of the constant mean image (exact for the mean of a constant-mean image; zero for the high-passes).
Per-channel statistics of the filtered training set (as for CIFAR-10) are not computed: that would need a pass over
1.28M decoded, randomly cropped images, and models trained with these constants stay consistent with this module.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import Dataset, Subset

from datamodules.base import DatasetNotFoundError, FrequencyDataModule, split_indices

LAYOUT = (
    "Expected image folders <data_dir>/train/<class>/*.JPEG and <data_dir>/val/<class>/*.JPEG (validation images "
    "sorted into class folders). ImageNet cannot be downloaded automatically: get ILSVRC2012 from "
    "https://image-net.org and extract it into that layout."
)
FIX = "point --data.data_dir at it."
HOW_TO_GET = f"{LAYOUT} Then {FIX}"


class ImageNetDataModule(FrequencyDataModule):
    """ImageNet (3 x image_size x image_size). Train: RandomResizedCrop(image_size) + RandomHorizontalFlip;
    eval: Resize(resize) + CenterCrop(image_size); then ToTensor ([0, 1]) and the frequency transform.
    Subspaces: 16x16 DCT blocks, step 16 (14 for 224)."""

    name = "imagenet"
    MEAN = (0.485, 0.456, 0.406)
    STD = (0.229, 0.224, 0.225)
    subspace_block = 16
    subspace_step = 16

    def __init__(
        self,
        data_dir: str = "data",
        image_size: int = 224,
        resize: int = 256,
        **kwargs: Any,
    ):
        if image_size < 1 or resize < image_size:
            raise ValueError(f"need 1 <= image_size <= resize, got image_size={image_size}, resize={resize}")
        super().__init__(data_dir=data_dir, **kwargs)  # FrequencyDataModule arguments
        self._classes: list[str] | None = None
        self._datasets: dict[str, Dataset] = {}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.hparams.image_size, self.hparams.image_size)

    # ---- folders -----------------------------------------------------------------------------------------
    def _split_dir(self, split: str) -> Path:
        path = self.data_path / split
        if not path.is_dir():
            raise self._missing(f"no {split}/ directory")
        return path

    def _missing(self, problem: str) -> DatasetNotFoundError:
        where = f"ImageNet not found in data_dir={str(self.data_path)!r} (resolved: {self.data_path.resolve()})"
        return DatasetNotFoundError(f"{where}: {problem}. {LAYOUT}", FIX)

    @property
    def classes(self) -> list[str]:
        """Sorted class folder names of train/ (or val/ when train/ is absent); read once."""
        if self._classes is None:
            split = "train" if (self.data_path / "train").is_dir() else "val"
            if not (self.data_path / split).is_dir():
                raise self._missing("neither train/ nor val/ exists")
            from torchvision.datasets.folder import find_classes

            try:
                self._classes = find_classes(str(self.data_path / split))[0]
            except FileNotFoundError as err:  # no class folders
                raise self._missing(str(err)) from err
        return self._classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    # ---- transforms and datasets -------------------------------------------------------------------------
    def _transforms(self, train: bool) -> Callable:
        from torchvision import transforms as T  # torchvision only once images are read

        size, resize = self.hparams.image_size, self.hparams.resize
        crop = (
            [T.RandomResizedCrop(size), T.RandomHorizontalFlip()] if train else [T.Resize(resize), T.CenterCrop(size)]
        )
        return T.Compose([*crop, T.ToTensor(), self.frequency_transform])

    def _folder(self, split: str, train_transforms: bool) -> Dataset:
        key = f"{split}/{'train' if train_transforms else 'eval'}"
        if key not in self._datasets:
            from datamodules.image_folder import FixedClassImageFolder

            root = str(self._split_dir(split))
            self._datasets[key] = FixedClassImageFolder(root, self.classes, self._transforms(train_transforms))
            if len(self._datasets[key]) == 0:
                raise self._missing(f"no images found under {root}")
        return self._datasets[key]

    def _fit_indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        return split_indices(len(self._folder("train", True)), self.hparams.val_split, self.hparams.seed)

    @property
    def train_set(self) -> Dataset:
        folder = self._folder("train", True)
        return folder if self.hparams.val_split == 0 else Subset(folder, self._fit_indices()[0].tolist())

    @property
    def val_set(self) -> Dataset:
        if self.hparams.val_split == 0:
            return self.test_set
        return Subset(self._folder("train", False), self._fit_indices()[1].tolist())

    @property
    def test_set(self) -> Dataset:
        return self._folder("val", False)

    def prepare_data(self) -> None:
        if self.hparams.download:
            rank_zero_warn(f"download=True is ignored for ImageNet. {HOW_TO_GET}")
