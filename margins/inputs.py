"""The inputs of a margin evaluation: model and data from a checkpoint (+ overrides), what a folder records of them.

Which samples and subspaces are measured is `margins.settings.RowSettings`.

The data is the checkpoint's datamodule (`datamodules.FrequencyDataModule`: same arguments, hparams, datasets and
normalisation). Every function raises `common.errors.InputError` (one line naming the problem and the fix) on bad
input.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from common.errors import InputError
from datamodules import DATASETS, FrequencyDataModule, build_datamodule
from datamodules.base import DatasetNotFoundError
from frequency.grid import DCTGridSubspaces
from frequency.random_subspaces import RandomSubspaces
from frequency.subspaces import BasisSubspaces, DCTBlockSubspaces, FullSpace, SubspaceFamily
from models import (
    MODEL_NAMES,
    CheckpointInfo,
    CheckpointMismatchError,
    Normalize,
    NormalizedModel,
    build_model,
    file_sha256,
    inspect_checkpoint,
    load_weights,
)


@dataclass(frozen=True)
class ModelSource:
    """Where the model and data come from: a checkpoint plus optional overrides (the CLI's first flag group)."""

    checkpoint: str | Path
    model: str | None = None
    dataset: str | None = None
    transform: str | None = None
    bandwidth: int | None = None
    data_dir: str | None = None
    num_classes: int | None = None
    trusted_pickle: bool = False


@dataclass
class LoadedSource:
    """The eval-mode model `[B, C, H, W] -> logits`, its datamodule, hyperparameters and checkpoint facts."""

    model: nn.Module
    datamodule: FrequencyDataModule
    hparams: dict[str, Any]
    info: CheckpointInfo
    sha256: str


def load_source(src: ModelSource) -> LoadedSource:
    """Read the checkpoint once, build its data and model (flags on top of what the checkpoint records)."""
    info = inspect_checkpoint(Path(src.checkpoint).expanduser(), src.trusted_pickle)
    net = resolve_net(src, info)
    dm = make_datamodule(src, info)
    hp = model_hparams(src, info, dm, net)
    model = make_model(hp, info, dm)
    info.content = None  # the weights now live in the model
    return LoadedSource(model, dm, hp, info, file_sha256(info.path))


def load_model_and_data(
    checkpoint: str | Path, data_dir: str | None = None, trusted_pickle: bool = False
) -> tuple[nn.Module, FrequencyDataModule]:
    """The eval-mode model `[B, C, H, W] in the data's space -> logits` and the datamodule of this project's
    checkpoint (datasets, normalisation, hparams); `data_dir` overrides the recorded one. Raises InputError on bad
    input."""
    loaded = load_source(ModelSource(checkpoint, data_dir=data_dir, trusted_pickle=trusted_pickle))
    return loaded.model, loaded.datamodule


def make_datamodule(src: ModelSource, info: CheckpointInfo) -> FrequencyDataModule:
    """The checkpoint's datamodule (same dataset and constructor arguments) with the explicit overrides on top."""
    recorded = info.data_hparams.get("dataset")
    dataset = src.dataset or recorded
    if dataset is None:
        raise InputError(
            f"{info.path} records no dataset (a raw state_dict has no hyperparameters): pass --model and --dataset"
        )
    if dataset not in DATASETS:
        raise InputError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    accepted = DATASETS[dataset].argument_names()
    kwargs = {k: v for k, v in info.data_hparams.items() if k in accepted} if dataset == recorded else {}
    for key, value in (("data_dir", src.data_dir), ("transform", src.transform), ("bandwidth", src.bandwidth)):
        if value is not None:
            kwargs[key] = value
    kwargs["download"] = False
    try:
        return build_datamodule(dataset, **kwargs)
    except (ValueError, TypeError) as err:  # constructor validation of the recorded/flagged arguments
        raise InputError(f"cannot build the {dataset} datamodule: {' '.join(str(err).split())}") from err


def margin_dataset(dm: FrequencyDataModule, data_dir_from_checkpoint: bool, command: str | None = None) -> Any:
    """The margin dataset (test split). Missing, it is an error whose fix names `command`'s own flag (--data-dir;
    the Python API's data_dir without a command), not the datamodule's (train.py's --data.download)."""
    try:
        return dm.margin_dataset()
    except DatasetNotFoundError as err:
        where = "; data_dir came from the checkpoint" if data_dir_from_checkpoint else ""
        if command is None:
            fix = f"pass data_dir (ModelSource) pointing at the dataset (evaluate_margins never downloads{where})"
        else:
            fix = f"pass --data-dir DIR pointing at the dataset ({command} never downloads{where})"
        raise DatasetNotFoundError(" ".join(err.problem.split()), fix) from err


def describe_family(family: SubspaceFamily) -> dict[str, Any]:
    """What a result folder records about its subspaces: kind (`subspace`), block side (`subspace_dim`) and step
    (`subspace_step`, a grid's stride), count (`num_subspaces`), each subspace's dimension (`subspace_size`: one
    number when they are equal), the family's repr and the SHA-256 of its tensors (equal families, equal
    digests)."""
    kinds = {
        DCTBlockSubspaces: "dct",
        DCTGridSubspaces: "grid",
        RandomSubspaces: "random",
        BasisSubspaces: "basis",
        FullSpace: "full",
    }
    dims = family.dims
    return {
        "subspace": kinds.get(type(family), type(family).__name__),
        "subspace_dim": getattr(family, "block", None),
        "subspace_step": getattr(family, "step", getattr(family, "stride", None)),
        "num_subspaces": len(family),
        "subspace_size": dims[0] if len(set(dims)) == 1 else dims,
        "subspace_family": repr(family),
        "subspace_sha256": _family_sha256(family),
    }


def _family_sha256(family: SubspaceFamily) -> str:
    digest = hashlib.sha256(type(family).__name__.encode())
    for name, value in sorted(vars(family).items()):
        tensors = value if isinstance(value, (list, tuple)) else [value]
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                digest.update(name.encode())
                digest.update(tensor_bytes(tensor))
    return digest.hexdigest()


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The bytes of a tensor's values in row-major order (any strides, any dtype)."""
    dense = torch.empty(tensor.shape, dtype=tensor.dtype).copy_(tensor.detach().cpu()).reshape(-1)  # 0-d: 1-d
    return dense.view(torch.uint8).numpy().tobytes() if dense.numel() else b""


def resolve_net(src: ModelSource, info: CheckpointInfo) -> str:
    """The zoo name: the checkpoint's `hyper_parameters.net` or --model (both given: they must agree)."""
    net = info.model_hparams.get("net")
    if net is None and src.model is None:
        raise InputError(
            f"{info.path} records no model (a raw state_dict has no hyperparameters): pass --model and --dataset"
        )
    if net is not None and src.model is not None and src.model != net:
        raise InputError(
            f"--model {src.model} contradicts the checkpoint, which holds a {net!r} network "
            f"(hyper_parameters.net); drop --model or pass the {src.model} checkpoint"
        )
    if (net or src.model) not in MODEL_NAMES:
        raise InputError(f"the network {net or src.model!r} is not in the model zoo ({', '.join(MODEL_NAMES)})")
    return net or src.model


def model_hparams(src: ModelSource, info: CheckpointInfo, dm: FrequencyDataModule, net: str) -> dict[str, Any]:
    """`{"net", "num_classes", "image_shape", ...}`: the checkpoint's record, or the flags and the dataset's."""
    recorded = info.model_hparams
    num_classes = recorded.get("num_classes")
    if num_classes is not None and src.num_classes is not None and src.num_classes != num_classes:
        raise InputError(f"--num-classes {src.num_classes} contradicts the checkpoint's num_classes={num_classes}")
    if num_classes is None:
        num_classes = src.num_classes if src.num_classes is not None else dm.num_classes
    image_shape = tuple(int(v) for v in recorded.get("image_shape", dm.image_shape))
    if image_shape != tuple(dm.image_shape):
        raise InputError(
            f"the checkpoint's model takes images of shape {image_shape} but {dm.name} gives {tuple(dm.image_shape)}; "
            "use the dataset the model was trained on"
        )
    return {**recorded, "net": net, "num_classes": int(num_classes), "image_shape": image_shape}


def make_model(hp: dict[str, Any], info: CheckpointInfo, dm: FrequencyDataModule) -> nn.Module:
    """NormalizedModel with the checkpoint's weights; its normalisation from the checkpoint or the datamodule."""
    shape = hp["image_shape"]
    net = build_model(hp["net"], num_classes=hp["num_classes"], in_channels=shape[0], image_size=shape[1:])
    normalize = Normalize.identity(shape) if info.carries_normalization else dm.normalization()
    model = NormalizedModel(normalize, net)
    try:
        load_weights(model, info.path, content=info.content)
    except CheckpointMismatchError as err:
        raise CheckpointMismatchError(
            _mismatch_line(err, info.path, hp["net"]), err.missing, err.unexpected, err.shape_mismatches
        ) from err
    return model.eval()


def _mismatch_line(err: CheckpointMismatchError, path: Path, net: str) -> str:
    parts = []
    for what, keys in (
        ("missing", err.missing),
        ("unexpected", err.unexpected),
        ("shape mismatch", err.shape_mismatches),
    ):
        if keys:
            parts.append(f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
    suggestion = str(err).strip().splitlines()[-1].strip()
    if "num_classes" in suggestion:
        suggestion += " (for a raw state_dict: --num-classes)"
    return f"checkpoint {path} does not fit --model {net}: {'; '.join(parts)}. {suggestion}"


def check_forward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """One clean forward pass on samples `x: [n, C, H, W]`: the model must take them and output enough classes."""
    try:
        with torch.no_grad():
            logits = model(x)
    except (RuntimeError, ValueError) as err:
        raise InputError(f"the model cannot take the dataset's images {tuple(x.shape[1:])}: {err}") from err
    if logits.dim() != 2:
        raise InputError(f"the model returns shape {tuple(logits.shape)}, not logits [N, num_classes]")
    if int(y.max()) >= logits.shape[1]:
        raise InputError(
            f"the dataset has labels up to {int(y.max())} but the model outputs {logits.shape[1]} classes; "
            "check --dataset / --num-classes"
        )


def default_output_dir(
    net: str, dm: FrequencyDataModule, checkpoint: Path, kind: str = "dct", root: str = "outputs/margins"
) -> Path:
    """<root>/<model>_<dataset>[_<transform>][_<kind>]_<run>, the run named after the checkpoint's place:
    logs/mnist_lenet/version_3/checkpoints/last.ckpt -> lenet_mnist_mnist_lenet-version_3-last (DCT blocks)."""
    transform = "" if dm.hparams.transform == "none" else f"_{dm.hparams.transform}"
    path = checkpoint.expanduser().resolve()
    if path.parent.name == "checkpoints":
        run = [path.parent.parent.parent.name, path.parent.parent.name, path.stem]
    else:
        run = [path.parent.name, path.stem]
    name = "-".join(part for part in run if part)
    family = "" if kind == "dct" else f"_{kind}"
    return Path(root) / f"{net}_{dm.name}{transform}{family}_{name}"


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
