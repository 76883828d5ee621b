"""MNIST (1x28x28, 10 classes) in memory, via torchvision's raw idx files; no augmentation (release)."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.datasets import MNIST

from datamodules.base import DatasetNotFoundError, TensorDataModule

RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
LEGACY_FILES = ("training.pt", "test.pt")  # torchvision's old processed layout, still read by torchvision


def _has_mnist(root: Path) -> bool:
    raw, processed = root / "MNIST" / "raw", root / "MNIST" / "processed"
    return all((raw / f).is_file() for f in RAW_FILES) or all((processed / f).is_file() for f in LEGACY_FILES)


def resolve_mnist_root(data_dir: str | Path) -> Path:
    """torchvision root (the parent of `MNIST/`) for `data_dir`, which may also point at `MNIST/` or `MNIST/raw/`.

    Raises DatasetNotFoundError naming the directory, the expected layout and how to get the files.
    """
    data_dir = Path(data_dir).expanduser()
    candidates = [data_dir]
    if data_dir.name == "MNIST":
        candidates.append(data_dir.parent)
    if data_dir.name == "raw" and data_dir.parent.name == "MNIST":
        candidates.append(data_dir.parent.parent)
    for root in candidates:
        if _has_mnist(root):
            return root
    raw = data_dir / "MNIST" / "raw"
    missing = [f for f in RAW_FILES if not (raw / f).is_file()]
    raise DatasetNotFoundError(
        f"MNIST not found in data_dir={str(data_dir)!r}: looked in {raw.resolve()}, missing {', '.join(missing)}. "
        f"Expected the uncompressed torchvision layout <data_dir>/MNIST/raw/{RAW_FILES[0]} "
        f"(and {', '.join(RAW_FILES[1:])} in the same folder). Fix: pass --data.download true (prepare_data "
        "downloads them; it also extracts .gz files already placed in MNIST/raw), or copy the four files there, or "
        "point data_dir at the directory that contains MNIST/."
    )


class MNISTDataModule(TensorDataModule):
    """MNIST as in-memory float tensors `[N, 1, 28, 28]` in [0, 1] (before the frequency transform).

    60000 training / 10000 test images. Subspaces: DCT blocks 8x8, step 1 (21 subspaces).
    """

    name = "mnist"
    MEAN = (0.1307,)
    STD = (0.3081,)
    subspace_block = 8
    IMAGE_SHAPE = (1, 28, 28)
    NUM_CLASSES = 10
    subspace_step = 1

    def prepare_data(self) -> None:
        """Download (only with download=True) into `<data_dir>/MNIST/raw`."""
        if self.hparams.download:
            for train in (True, False):
                MNIST(root=str(self.data_path), train=train, download=True)

    def _load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        root = resolve_mnist_root(self.data_path)
        dataset = MNIST(root=str(root), train=train, download=False)
        x = dataset.data.unsqueeze(1).float().div_(255.0)  # uint8 [N, 28, 28] -> [N, 1, 28, 28] in [0, 1]
        return x, torch.as_tensor(dataset.targets, dtype=torch.long)
