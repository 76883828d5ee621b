"""Choosing samples and reading them: the data side of a margin experiment."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEFAULT_NUM_SAMPLES = 100  # samples a margin evaluation draws when none are given (the paper's)


def select_indices(dataset_size: int, num_samples: int, seed: int) -> np.ndarray:
    """`num_samples` distinct dataset indices drawn uniformly with `np.random.default_rng(seed)`.

    Returns int64 [num_samples], SORTED ascending (samples then appear in dataset order; the chosen set
    depends only on the three arguments). Save the result (indices.npy) to reproduce a run exactly.
    """
    for name, value in (("dataset_size", dataset_size), ("num_samples", num_samples), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an integer, got {value!r}")
    if dataset_size <= 0:
        raise ValueError(f"dataset_size must be positive, got {dataset_size} (is the dataset empty?)")
    if not 0 < num_samples <= dataset_size:
        raise ValueError(
            f"num_samples must be between 1 and the dataset size {dataset_size}, got {num_samples}; "
            "request fewer samples or use a larger split"
        )
    rng = np.random.default_rng(int(seed))
    return np.sort(rng.choice(int(dataset_size), size=int(num_samples), replace=False)).astype(np.int64)


def load_indices(path: str | Path, dataset_size: int) -> np.ndarray:
    """Dataset indices from a `.npy` file holding a 1-D integer array; returns int64 [N] in the file's order.

    Raises FileNotFoundError for a missing file and ValueError for an unreadable file, a wrong dtype or
    shape, an empty array, indices outside `[0, dataset_size)` or duplicate indices (the message lists them).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"indices file {path} does not exist; give a .npy file of dataset indices")
    try:
        indices = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise ValueError(f"cannot read {path} as a .npy array of indices ({error}); save one with np.save") from error
    if not isinstance(indices, np.ndarray):
        raise ValueError(f"{path} is not a single .npy array (an .npz archive?); save one array with np.save")
    if not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"indices in {path} must be integers, got dtype {indices.dtype}; save an int64 array")
    if indices.ndim != 1 or indices.size == 0:
        raise ValueError(f"indices in {path} must be a non-empty 1-D array, got shape {indices.shape}")
    indices = indices.astype(np.int64)
    outside = indices[(indices < 0) | (indices >= dataset_size)]
    if outside.size:
        raise ValueError(
            f"{outside.size} indices in {path} are outside [0, {dataset_size}) for this dataset, e.g. "
            f"{outside[:5].tolist()}; were they made for another split?"
        )
    values, counts = np.unique(indices, return_counts=True)
    duplicates = values[counts > 1]
    if duplicates.size:
        raise ValueError(f"indices in {path} contain duplicates: {duplicates[:10].tolist()}; each sample once")
    return indices


def gather_samples(dataset: Any, indices: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack `dataset[i] = (image [C, H, W] float tensor, label)` for `i` in `indices`.

    Returns `x: [N, C, H, W]` (the dataset's floating dtype, e.g. pixels in [0, 1] after ToTensor) and
    `y: [N]` int64 ground-truth labels.
    """
    indices = np.asarray(indices)
    if indices.ndim != 1 or indices.size == 0 or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"indices must be a non-empty 1-D integer array, got {indices.dtype} {indices.shape}")
    images, labels = [], []
    for i in indices.tolist():
        item = dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise ValueError(f"dataset[{i}] must be an (image, label) pair, got {type(item).__name__}")
        image, label = item[0], item[1]
        if isinstance(image, np.ndarray):
            image = torch.from_numpy(image)
        if not isinstance(image, torch.Tensor):
            raise TypeError(
                f"dataset[{i}] image is a {type(image).__name__}, not a tensor; "
                "add transforms.ToTensor() to its transform"
            )
        if image.dim() != 3 or not image.is_floating_point():
            raise ValueError(
                f"dataset[{i}] image must be a float tensor [C, H, W], got {image.dtype} {tuple(image.shape)}; "
                "use transforms.ToTensor() (pixels in [0, 1])"
            )
        images.append(image)
        labels.append(int(label))
    shapes = {tuple(image.shape) for image in images}
    if len(shapes) > 1:
        raise ValueError(f"dataset images have different shapes {sorted(shapes)}; resize/crop them to one shape")
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)
