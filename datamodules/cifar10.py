"""CIFAR-10 (3x32x32, 10 classes) in memory, via torchvision's python-pickle files; no augmentation (release).

torchvision (its md5-checked reader) is imported when the files are read, not with this module."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from datamodules.base import DatasetNotFoundError, TensorDataModule

FOLDER = "cifar-10-batches-py"  # torchvision's CIFAR10.base_folder
FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")  # its train, test and meta files


def resolve_cifar10_root(data_dir: str | Path) -> Path:
    """torchvision root (the parent of `cifar-10-batches-py/`) for `data_dir`, which may also point at that folder.

    Raises DatasetNotFoundError naming the directory, the expected layout and how to get the files.
    """
    data_dir = Path(data_dir).expanduser()
    candidates = [data_dir] + ([data_dir.parent] if data_dir.name == FOLDER else [])
    for root in candidates:
        if all((root / FOLDER / f).is_file() for f in FILES):
            return root
    missing = [f for f in FILES if not (data_dir / FOLDER / f).is_file()]
    raise DatasetNotFoundError(
        f"CIFAR-10 not found in data_dir={str(data_dir)!r}: looked in {(data_dir / FOLDER).resolve()}, missing "
        f"{', '.join(missing)}. Expected torchvision's python layout <data_dir>/{FOLDER}/{FILES[0]} (and "
        f"{', '.join(FILES[1:])} in the same folder).",
        "pass --data.download true (prepare_data downloads and extracts cifar-10-python.tar.gz), or extract that "
        f"archive into data_dir yourself (it creates {FOLDER}/).",
    )


class CIFAR10DataModule(TensorDataModule):
    """CIFAR-10 as in-memory float tensors `[N, 3, 32, 32]` in [0, 1] (before the frequency transform); downloads
    with download=True.

    50000 training / 10000 test images. Files are md5-checked by torchvision. Subspaces: 8x8 blocks, step 2 (13).
    """

    name = "cifar10"
    MEAN = (0.4914, 0.4822, 0.4465)
    STD = (0.247, 0.243, 0.261)
    subspace_block = 8
    IMAGE_SHAPE = (3, 32, 32)
    NUM_CLASSES = 10
    subspace_step = 2

    def _load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision.datasets import CIFAR10

        root = resolve_cifar10_root(self.data_path)
        try:
            dataset = CIFAR10(root=str(root), train=train, download=False)
        except RuntimeError as err:  # files present (checked above) but torchvision's md5 check failed
            raise RuntimeError(
                f"CIFAR-10 files in {root / FOLDER} failed torchvision's md5 integrity check (corrupted, or not the "
                "official python version). Delete them and pass --data.download true, or re-extract "
                f"cifar-10-python.tar.gz. torchvision said: {err}"
            ) from err
        x = torch.from_numpy(np.ascontiguousarray(dataset.data)).permute(0, 3, 1, 2).contiguous().float().div_(255.0)
        return x, torch.as_tensor(dataset.targets, dtype=torch.long)

    def prepare_data(self) -> None:
        """Download (only with download=True) into `<data_dir>/cifar-10-batches-py`."""
        if self.hparams.download:
            from torchvision.datasets import CIFAR10

            CIFAR10(root=str(self.data_path), train=True, download=True)
