"""MNIST (1x28x28, 10 classes) in memory, read from torchvision's raw idx files (or its legacy processed files);
no augmentation (release). Reading needs no torchvision (only the download in `prepare_data` does)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

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
        f"(and {', '.join(RAW_FILES[1:])} in the same folder).",
        "pass --data.download true (prepare_data downloads them; it also extracts .gz files already placed in "
        "MNIST/raw), or copy the four files there, or point data_dir at the directory that contains MNIST/.",
    )


def read_idx(path: Path) -> torch.Tensor:
    """The uint8 array of an idx file (magic 0x08 0x<ndim>, big-endian sizes), as torchvision reads MNIST's."""
    data = path.read_bytes()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise RuntimeError(f"{path} is not an idx file of unsigned bytes (magic {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) != offset + int(np.prod(shape)):
        raise RuntimeError(f"{path} holds {len(data) - offset} bytes of data, its header says {shape}")
    return torch.from_numpy(np.frombuffer(data, np.uint8, offset=offset).reshape(shape).copy())


def read_mnist(root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images `[N, 28, 28]` and int64 labels `[N]` of a split under `root/MNIST`, as torchvision's `MNIST`
    reads them: its legacy `processed/{training,test}.pt` when both are present, else the raw idx files."""
    processed = root / "MNIST" / "processed"
    if all((processed / f).is_file() for f in LEGACY_FILES):
        images, labels = torch.load(processed / LEGACY_FILES[0 if train else 1], weights_only=True)
        return images, labels
    prefix = "train" if train else "t10k"
    raw = root / "MNIST" / "raw"
    return read_idx(raw / f"{prefix}-images-idx3-ubyte"), read_idx(raw / f"{prefix}-labels-idx1-ubyte").long()


class MNISTDataModule(TensorDataModule):
    """MNIST as in-memory float tensors `[N, 1, 28, 28]` in [0, 1] (before the frequency transform); downloads with
    download=True. 60000 training / 10000 test images. Subspaces: DCT blocks 8x8, step 1 (21 subspaces).
    """

    name = "mnist"
    MEAN = (0.1307,)
    STD = (0.3081,)
    subspace_block = 8
    IMAGE_SHAPE = (1, 28, 28)
    NUM_CLASSES = 10
    subspace_step = 1

    def _load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = read_mnist(resolve_mnist_root(self.data_path), train)
        x = images.unsqueeze(1).float().div_(255.0)  # uint8 [N, 28, 28] -> [N, 1, 28, 28] in [0, 1]
        return x, torch.as_tensor(labels, dtype=torch.long)

    def prepare_data(self) -> None:
        """Download (only with download=True) into `<data_dir>/MNIST/raw`."""
        if self.hparams.download:
            from torchvision.datasets import MNIST

            for train in (True, False):
                MNIST(root=str(self.data_path), train=train, download=True)
