"""What a margin evaluation measures: model and data from a checkpoint (+ overrides), samples, subspaces.

The data is the checkpoint's datamodule (`datamodules.FrequencyDataModule`: same arguments, hparams, datasets and
normalisation). Every function raises `common.errors.InputError` (one line naming the problem and the fix) on bad
input.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from common.errors import InputError
from datamodules import DATASETS, FrequencyDataModule, build_datamodule
from datamodules.base import DatasetNotFoundError
from frequency.families import FAMILY_KINDS, build_subspace_family
from frequency.grid import DCTGridSubspaces
from frequency.random_subspaces import RandomSubspaces
from frequency.subspaces import BasisSubspaces, DCTBlockSubspaces, FullSpace, SubspaceFamily
from margins.measure import load_indices, select_indices
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


@dataclass
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


def choose_indices(num_samples: int, seed: int, indices_file: str | None, size: int, name: str) -> np.ndarray:
    """int64 [N] dataset indices: the file's (in order) or `num_samples` drawn with `seed` (sorted). Errors name
    the parameter and its flag: `num_samples=500 (--num-samples) is not in [1, 100]`."""
    if indices_file is not None:
        try:
            return load_indices(indices_file, size)
        except (ValueError, FileNotFoundError) as err:
            raise InputError(" ".join(str(err).split())) from err
    if not 0 < num_samples <= size:
        raise InputError(
            f"num_samples={num_samples} (--num-samples) is not in [1, {size}]: the {name} test split has {size} samples"
        )
    return select_indices(size, num_samples, seed)


@dataclass
class SubspaceSpec:
    """Which subspace family to measure along, resolved against a dataset by `make_subspaces`.

    kind: "dct" (diagonal DCT blocks, the paper's), "full" (the whole input space, one row), "grid" (DCT blocks on a
    2-D grid of the spectrum), "random" (seeded random subspaces of the DCT blocks' dimension) or "basis" (bases
    from files). dim: block side k (default: the dataset's); step: block step, or the grid's stride (default: the
    dataset's step; for grids k // 2); count, seed, method: random subspaces (default count: as many as DCT
    blocks); bases: .npy/.pt files of [D, k] orthonormal bases.
    """

    kind: str = "dct"
    dim: int | None = None
    step: int | None = None
    count: int | None = None
    seed: int = 0
    method: str = "auto"
    bases: list[str] = field(default_factory=list)


def make_subspaces(spec: SubspaceSpec, dm: FrequencyDataModule) -> SubspaceFamily:
    """The family `spec` names for the images of `dm` (defaults per dataset); InputError on bad settings."""
    shape = tuple(dm.image_shape)
    if spec.kind not in FAMILY_KINDS:
        raise InputError(
            f"unknown subspace kind {spec.kind!r} for subspace (--subspace); choose one of {', '.join(FAMILY_KINDS)}"
        )
    if spec.kind in ("full", "basis") and (spec.dim is not None or spec.step is not None):
        raise InputError(
            f"subspace_dim/subspace_step (--subspace-dim/--subspace-step) do not apply to {spec.kind} subspaces; "
            "leave them unset"
        )
    block = dm.subspace_block if spec.dim is None else spec.dim
    step = spec.step if spec.step is not None else (max(1, block // 2) if spec.kind == "grid" else dm.subspace_step)
    side = min(shape[1:])
    if spec.kind not in ("full", "basis") and not 1 <= block <= side:
        raise InputError(
            f"subspace_dim={block} (--subspace-dim) does not fit the {shape[1]}x{shape[2]} images of {dm.name}: use "
            f"1..{side}"
        )
    if step < 1:
        raise InputError(f"subspace_step={step} (--subspace-step) must be >= 1")
    if spec.count is not None and spec.count < 1:
        raise InputError(f"count={spec.count} (--count): the number of random subspaces must be >= 1")
    return build_subspace_family(
        spec.kind, shape, block, step, count=spec.count, seed=spec.seed, method=spec.method, bases=spec.bases or None
    )


def describe_family(family: SubspaceFamily) -> dict[str, Any]:
    """What a result folder records about its subspaces: kind, block side and step (or stride), count, the
    family's repr and the SHA-256 of its tensors (equal families, equal digests)."""
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
        "subspace_block": getattr(family, "block", None),
        "subspace_step": getattr(family, "step", getattr(family, "stride", None)),
        "num_subspaces": len(family),
        "subspace_dims": dims[0] if len(set(dims)) == 1 else dims,
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
