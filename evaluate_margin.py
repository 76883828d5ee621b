"""Measure the margins of a trained network along DCT frequency subspaces (or the full input space).

For each evaluated test sample and each subspace (low to high frequency) the margin is the L2 norm of the smallest
perturbation inside the subspace that changes the predicted label, estimated with subspace-constrained DeepFool
(release settings: overshoot 0.02, max 100 iterations, top-10 candidate classes). Defaults reproduce the paper:
100 test samples drawn with seed 0; DCT blocks 8x8 step 1 (MNIST), 8x8 step 2 (CIFAR-10), 16x16 step 16 (ImageNet).

Usage:

    # a checkpoint of this project (train.py): model, dataset, transform and data_dir are read from it
    python evaluate_margin.py --checkpoint logs/mnist_lenet/version_0/checkpoints/last.ckpt
    python evaluate_margin.py --checkpoint last.ckpt --data-dir /new/place/of/data --num-samples 500

    # the release's pretrained `model.t7` (a raw state_dict; the dataset's normalisation is put in front)
    python evaluate_margin.py --model lenet --dataset mnist --checkpoint path/model.t7 --data-dir data
    python evaluate_margin.py --model lenet --dataset mnist --transform flip --checkpoint flipped/model.t7
    python evaluate_margin.py --model resnet18 --dataset cifar10 --transform low_pass --bandwidth 16 \\
        --checkpoint lowpass/model.t7

    # MadryLab's robust ResNet-50 (pickled: only for files you trust; its normalisation is in the file)
    python evaluate_margin.py --model resnet50 --dataset imagenet --checkpoint imagenet_l2_3_0.pt \\
        --trusted-pickle --data-dir /path/imagenet

    # torchvision's ImageNet weights file (a raw state_dict, downloaded beforehand)
    python evaluate_margin.py --model resnet50 --dataset imagenet --checkpoint resnet50-0676ba61.pth \\
        --data-dir /path/imagenet

    # plain (unconstrained) DeepFool: one row; chosen samples: --indices FILE.npy (dataset indices, in order)
    python evaluate_margin.py --checkpoint last.ckpt --subspace full --indices my_indices.npy

Normalisation: a raw state_dict (the release's model.t7, torchvision weights) holds none, so the model is
`NormalizedModel(datamodule.normalization(), net)`; Lightning and MadryLab checkpoints carry their own, which is used.
Explicit flags override what a Lightning checkpoint records (e.g. --data-dir when the data moved); --model or
--num-classes contradicting it is an error.

Writes to --output-dir (default outputs/margins/<model>_<dataset>[_<transform>]_<checkpoint name>), all or nothing:
margins.npy float32 [S, N] (row s: subspace s, low to high frequency; column n: n-th sample), converged.npy bool
[S, N], indices.npy int64 [N], summary.json (settings, medians, non-converged counts, clean accuracy, seconds) and
margins.png. Bad input exits with status 2 and one line `error: ...` on stderr, before any computation.
"""

from __future__ import annotations

import argparse
import inspect
import pickle
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from attacks.deepfool import SubspaceDeepFool
from datamodules import DATASETS, TRANSFORMS, DatasetNotFoundError, FrequencyDataModule, build_datamodule
from frequency import DCTBlockSubspaces, FullSpace
from frequency.subspaces import SubspaceFamily
from margins import gather_samples, load_indices, measure_margins, save_margin_report, select_indices, summarize
from models import (
    MODEL_NAMES,
    CheckpointMismatchError,
    Normalize,
    NormalizedModel,
    UntrustedCheckpointError,
    build_model,
    load_weights,
)

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


class InputError(Exception):
    """Bad command-line input; the message is one line naming the problem and the fix."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message, and no SystemExit in main()
        raise InputError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="evaluate_margin.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = parser.add_argument_group("model and data")
    src.add_argument("--checkpoint", required=True, help="model.t7 / .pth state_dict, Lightning .ckpt, MadryLab .pt")
    src.add_argument("--model", choices=MODEL_NAMES, help="zoo architecture (default: from the checkpoint)")
    src.add_argument("--dataset", choices=tuple(DATASETS), help="dataset (default: from the checkpoint)")
    src.add_argument("--transform", choices=TRANSFORMS, help="frequency transform of the data (default: none)")
    src.add_argument("--bandwidth", type=int, help="block side of low_pass/high_pass (default 16)")
    src.add_argument("--data-dir", help="dataset directory (default: the checkpoint's, else 'data')")
    src.add_argument("--num-classes", type=int, help="classes of a raw state_dict's model (default: the dataset's)")
    src.add_argument(
        "--trusted-pickle",
        action="store_true",
        help="allow pickled Python objects in the checkpoint (MadryLab needs it); ONLY for files you trust",
    )
    sel = parser.add_argument_group("samples (from the test split)")
    sel.add_argument("--num-samples", type=int, default=100, help="samples drawn at random (default 100)")
    sel.add_argument("--seed", type=int, default=0, help="seed of the draw and of torch (default 0)")
    sel.add_argument("--indices", help="FILE.npy of dataset indices to evaluate, in order (overrides the draw)")
    sub = parser.add_argument_group("subspaces")
    sub.add_argument("--subspace", choices=("dct", "full"), default="dct", help="DCT blocks, or full space (1 row)")
    sub.add_argument("--subspace-dim", type=int, help="DCT block side k (default per dataset: 8, 8, 16)")
    sub.add_argument("--subspace-step", type=int, help="DCT block step (default per dataset: 1, 2, 16)")
    att = parser.add_argument_group("DeepFool")
    att.add_argument("--max-iter", type=int, default=100, help="iterations per (subspace, sample) (default 100)")
    att.add_argument("--overshoot", type=float, default=0.02, help="overshoot (default 0.02)")
    att.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="(subspace, sample) rows per chunk, bounds memory (default: 64 for ImageNet, 512 otherwise)",
    )
    run = parser.add_argument_group("run")
    run.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    run.add_argument("--output-dir", help="where results go (default outputs/margins/<model>_<dataset>_...)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


# ---- checkpoint --------------------------------------------------------------------------------------------
@dataclass
class CheckpointInfo:
    """What a checkpoint says about itself (read once before the model is built)."""

    path: Path
    fmt: str  # "lightning" | "madrylab" | "state_dict"
    model_hparams: dict[str, Any] = field(default_factory=dict)
    data_hparams: dict[str, Any] = field(default_factory=dict)
    carries_normalization: bool = False


def inspect_checkpoint(path: Path, trusted_pickle: bool) -> CheckpointInfo:
    """Format, hyperparameters and whether `path` holds its own normalisation; raises InputError if unreadable."""
    if not path.is_file():
        raise InputError(f"checkpoint file not found: {path} (resolved: {path.resolve()})")
    obj = _read_checkpoint(path, trusted_pickle)
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise InputError(f"{path} holds a {type(obj).__name__}, not a state_dict or a checkpoint dict")
    if isinstance(obj.get("state_dict"), Mapping):
        fmt, weights = "lightning", obj["state_dict"]
    elif isinstance(obj.get("model"), Mapping):
        fmt, weights = "madrylab", obj["model"]
    else:
        fmt, weights = "state_dict", obj
    carries = any(str(k).endswith(("normalize.mean", "normalizer.new_mean")) for k in weights)
    return CheckpointInfo(
        path=path,
        fmt=fmt,
        model_hparams=_public(obj.get("hyper_parameters")),
        data_hparams=_public(obj.get("datamodule_hyper_parameters")),
        carries_normalization=carries,
    )


def _read_checkpoint(path: Path, trusted_pickle: bool) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted_pickle)
    except pickle.UnpicklingError as err:
        if not trusted_pickle:
            raise InputError(
                f"{path} contains pickled Python objects, which are not loaded by default because unpickling can "
                "run arbitrary code; if (and only if) you trust this file (e.g. a MadryLab robustness checkpoint), "
                "pass --trusted-pickle"
            ) from err
        raise InputError(f"cannot read {path} as a PyTorch checkpoint: {_one_line(err)}") from err
    except (RuntimeError, EOFError, KeyError, ValueError) as err:
        raise InputError(f"cannot read {path} as a PyTorch checkpoint (corrupt or not saved by torch.save)") from err


def _public(hparams: object) -> dict[str, Any]:
    """A hyperparameter dict without the CLI's bookkeeping keys (`_class_path`, `_instantiator`)."""
    if not isinstance(hparams, Mapping):
        return {}
    return {str(k): v for k, v in hparams.items() if not str(k).startswith("_")}


# ---- data --------------------------------------------------------------------------------------------------
def make_datamodule(args: argparse.Namespace, info: CheckpointInfo) -> FrequencyDataModule:
    """The checkpoint's datamodule (same dataset and constructor arguments) with the explicit flags on top."""
    recorded = info.data_hparams.get("dataset")
    dataset = args.dataset or recorded
    if dataset is None:
        raise InputError(
            f"{info.path} records no dataset (a raw state_dict has no hyperparameters): pass --model and --dataset"
        )
    cls = DATASETS[dataset]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    kwargs = {k: v for k, v in info.data_hparams.items() if k in accepted} if dataset == recorded else {}
    for key, value in (("data_dir", args.data_dir), ("transform", args.transform), ("bandwidth", args.bandwidth)):
        if value is not None:
            kwargs[key] = value
    kwargs["download"] = False
    return build_datamodule(dataset, **kwargs)


def dataset_size(dm: FrequencyDataModule, data_dir_from_checkpoint: bool) -> tuple[Any, int]:
    """The margin dataset (test split) and its length; a missing dataset becomes a one-line InputError."""
    try:
        dataset = dm.margin_dataset()
        return dataset, len(dataset)
    except DatasetNotFoundError as err:
        where = "data_dir came from the checkpoint; " if data_dir_from_checkpoint else ""
        hint = f" [evaluate_margin.py never downloads: {where}pass --data-dir DIR pointing at the dataset]"
        raise InputError(_one_line(err) + hint) from err


def choose_indices(args: argparse.Namespace, size: int, dataset: str) -> np.ndarray:
    if args.indices is not None:
        return load_indices(args.indices, size)
    if not 0 < args.num_samples <= size:
        raise InputError(
            f"--num-samples {args.num_samples} is not in [1, {size}]: the {dataset} test split has {size} samples; "
            f"pass --num-samples <= {size}"
        )
    return select_indices(size, args.num_samples, args.seed)


def make_subspaces(args: argparse.Namespace, dm: FrequencyDataModule) -> SubspaceFamily:
    shape = dm.image_shape
    if args.subspace == "full":
        if args.subspace_dim is not None or args.subspace_step is not None:
            raise InputError("--subspace-dim/--subspace-step only apply to --subspace dct; drop them with full")
        return FullSpace(shape)
    block = dm.subspace_block if args.subspace_dim is None else args.subspace_dim
    step = dm.subspace_step if args.subspace_step is None else args.subspace_step
    side = min(shape[1:])
    if not 1 <= block <= side:
        raise InputError(
            f"--subspace-dim {block} does not fit the {shape[1]}x{shape[2]} images of {dm.name}: use 1..{side}"
        )
    if step < 1:
        raise InputError(f"--subspace-step must be >= 1, got {step}")
    return DCTBlockSubspaces(shape, block, step)


# ---- model -------------------------------------------------------------------------------------------------
def resolve_net(args: argparse.Namespace, info: CheckpointInfo) -> str:
    """The zoo name: the checkpoint's `hyper_parameters.net` or --model (both given: they must agree)."""
    net = info.model_hparams.get("net")
    if net is None and args.model is None:
        raise InputError(
            f"{info.path} records no model (a raw state_dict has no hyperparameters): pass --model and --dataset"
        )
    if net is not None and args.model is not None and args.model != net:
        raise InputError(
            f"--model {args.model} contradicts the checkpoint, which holds a {net!r} network "
            f"(hyper_parameters.net); drop --model or pass the {args.model} checkpoint"
        )
    if net is not None and net not in MODEL_NAMES:
        raise InputError(f"the checkpoint's network {net!r} is not in the model zoo ({', '.join(MODEL_NAMES)})")
    return net or args.model


def model_hparams(args: argparse.Namespace, info: CheckpointInfo, dm: FrequencyDataModule, net: str) -> dict[str, Any]:
    """`{"net", "num_classes", "image_shape", ...}`: the checkpoint's record, or the flags and the dataset's."""
    recorded = info.model_hparams
    num_classes = recorded.get("num_classes")
    if num_classes is not None and args.num_classes is not None and args.num_classes != num_classes:
        raise InputError(
            f"--num-classes {args.num_classes} contradicts the checkpoint's num_classes={num_classes}; drop it"
        )
    if num_classes is None:
        num_classes = args.num_classes if args.num_classes is not None else dm.num_classes
    image_shape = tuple(int(v) for v in recorded.get("image_shape", dm.image_shape))
    if image_shape != tuple(dm.image_shape):
        raise InputError(
            f"the checkpoint's model takes images of shape {image_shape} but {dm.name} gives {tuple(dm.image_shape)}; "
            "use the dataset the model was trained on"
        )
    return {**recorded, "net": net, "num_classes": int(num_classes), "image_shape": image_shape}


def make_model(hp: dict[str, Any], info: CheckpointInfo, dm: FrequencyDataModule, trusted: bool) -> nn.Module:
    """NormalizedModel with the checkpoint's weights; its normalisation from the checkpoint or the datamodule."""
    shape = hp["image_shape"]
    net = build_model(hp["net"], num_classes=hp["num_classes"], in_channels=shape[0], image_size=shape[1:])
    normalize = Normalize.identity(shape) if info.carries_normalization else dm.normalization()
    model = NormalizedModel(normalize, net)
    try:
        load_weights(model, info.path, trusted_pickle=trusted)
    except CheckpointMismatchError as err:
        raise InputError(_mismatch_line(err, info.path, hp["net"])) from err
    except UntrustedCheckpointError as err:
        raise InputError(
            f"{info.path} contains pickled Python objects; pass --trusted-pickle only if you trust it"
        ) from err
    return model.eval()


def load_model_and_data(
    checkpoint: str | Path, data_dir: str | None = None, trusted_pickle: bool = False
) -> tuple[nn.Module, FrequencyDataModule]:
    """The eval-mode model `[B, C, H, W] in the data's space -> logits` and datamodule of this project's checkpoint
    (also usable from other scripts); `data_dir` overrides the recorded one. Raises InputError on bad input."""
    args = build_parser().parse_args(["--checkpoint", str(checkpoint), *(["--data-dir", data_dir] if data_dir else [])])
    info = inspect_checkpoint(Path(checkpoint).expanduser(), trusted_pickle)
    dm = make_datamodule(args, info)
    hp = model_hparams(args, info, dm, resolve_net(args, info))
    return make_model(hp, info, dm, trusted_pickle), dm


def _mismatch_line(err: CheckpointMismatchError, path: Path, net: str) -> str:
    parts = []
    for what, keys in (
        ("missing", err.missing),
        ("unexpected", err.unexpected),
        ("shape mismatch", err.shape_mismatches),
    ):
        if keys:
            shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
            parts.append(f"{len(keys)} {what} ({shown})")
    suggestion = str(err).strip().splitlines()[-1].strip()
    if "num_classes" in suggestion:
        suggestion += " (for a raw state_dict: --num-classes)"
    return f"checkpoint {path} does not fit --model {net}: {'; '.join(parts)}. {suggestion}"


def check_forward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """One clean forward pass on a sample: the model must take the images and output enough classes."""
    try:
        with torch.no_grad():
            logits = model(x[:1])
    except (RuntimeError, ValueError) as err:
        raise InputError(f"the model cannot take the dataset's images {tuple(x.shape[1:])}: {_one_line(err)}") from err
    if logits.dim() != 2:
        raise InputError(f"the model returns shape {tuple(logits.shape)}, not logits [N, num_classes]")
    if int(y.max()) >= logits.shape[1]:
        raise InputError(
            f"the dataset has labels up to {int(y.max())} but the model outputs {logits.shape[1]} classes; "
            "check --dataset / --num-classes"
        )


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise InputError(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name} requested but CUDA is not available; use --device cpu")
    return device


# ---- the run -----------------------------------------------------------------------------------------------
@dataclass
class Job:
    """Everything validated and loaded, ready for the (possibly long) attack."""

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    indices: np.ndarray
    subspaces: SubspaceFamily
    attack: SubspaceDeepFool
    device: torch.device
    output_dir: Path
    settings: dict[str, Any]
    title: str


def prepare(args: argparse.Namespace, argv: list[str]) -> Job:
    """Validate every input and load model and samples; raises InputError (or a library error) on bad input."""
    if (
        args.max_iter < 1
        or (args.batch_size is not None and args.batch_size < 1)
        or not np.isfinite(args.overshoot)
        or args.overshoot < 0
    ):
        raise InputError("--max-iter and --batch-size must be >= 1 and --overshoot a finite number >= 0")
    device = resolve_device(args.device)
    info = inspect_checkpoint(Path(args.checkpoint).expanduser(), args.trusted_pickle)
    net = resolve_net(args, info)
    dm = make_datamodule(args, info)
    subspaces = make_subspaces(args, dm)
    from_checkpoint = args.data_dir is None and dm.hparams.data_dir == info.data_hparams.get("data_dir")
    dataset, size = dataset_size(dm, from_checkpoint)
    indices = choose_indices(args, size, dm.name)
    hp = model_hparams(args, info, dm, net)
    output_dir = Path(args.output_dir or default_output_dir(hp["net"], dm, info.path)).expanduser()
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"--output-dir {output_dir} exists and is not a directory; choose another path")
    model = make_model(hp, info, dm, args.trusted_pickle)
    x, y = gather_samples(dataset, indices)
    check_forward(model, x, y)
    batch_size = args.batch_size or (64 if dm.name == "imagenet" else 512)
    attack = SubspaceDeepFool(overshoot=args.overshoot, max_iter=args.max_iter, batch_size=batch_size)
    settings = {
        "source": "evaluate_margin",
        "command": ["evaluate_margin.py", *argv],
        "model": hp,
        "data": dict(dm.hparams),
        "checkpoint": str(info.path.resolve()),
        "checkpoint_format": info.fmt,
        "normalization": "checkpoint" if info.carries_normalization else "dataset",
        "dataset": dm.name,
        "transform": dm.hparams.transform,
        "bandwidth": dm.hparams.bandwidth,
        "data_dir": str(dm.data_path.resolve()),
        "split": "test",
        "num_samples": len(indices),
        "seed": args.seed,
        "indices_file": str(Path(args.indices).expanduser().resolve()) if args.indices else None,
        "subspace": args.subspace,
        "subspace_block": getattr(subspaces, "block", None),
        "subspace_step": getattr(subspaces, "step", None),
        "num_subspaces": len(subspaces),
        "overshoot": attack.overshoot,
        "max_iter": attack.max_iter,
        "num_candidates": attack.num_candidates,
        "batch_size": attack.batch_size,
        "device": str(device),
        "torch_version": torch.__version__,
    }
    transform = "" if dm.hparams.transform == "none" else f" ({dm.hparams.transform})"
    title = f"{hp['net']} on {dm.name}{transform}"
    return Job(model, x, y, indices, subspaces, attack, device, output_dir, settings, title)


def default_output_dir(net: str, dm: FrequencyDataModule, checkpoint: Path) -> Path:
    transform = "" if dm.hparams.transform == "none" else f"_{dm.hparams.transform}"
    return Path("outputs") / "margins" / f"{net}_{dm.name}{transform}_{checkpoint.stem}"


def run(job: Job, progress: bool) -> Path:
    """Measure and write the report; returns the output directory."""
    measured = measure_margins(job.model, job.x, job.subspaces, job.attack, device=job.device, progress=progress)
    result = measured.result
    save_margin_report(
        job.output_dir,
        result.margins,
        result.converged,
        result.iterations,
        job.indices,
        result.labels,
        job.y,
        job.settings,
        measured.seconds,
        title=job.title,
    )
    print_summary(
        job, result.margins.cpu().numpy(), result.converged.cpu().numpy(), result.labels.cpu(), measured.seconds
    )
    return job.output_dir


def print_summary(
    job: Job, margins: np.ndarray, converged: np.ndarray, predicted: torch.Tensor, seconds: float
) -> None:
    stats = summarize(margins.astype(np.float32), converged)
    s = job.settings
    space = (
        f"{s['num_subspaces']} DCT subspaces (block {s['subspace_block']}, step {s['subspace_step']})"
        if s["subspace"] == "dct"
        else "the full input space"
    )
    correct = int((predicted == job.y).sum())
    print(f"{job.title}: {s['num_samples']} samples, {space}")
    print(
        "median margin per subspace (low -> high frequency): "
        + " ".join(f"{v:.3g}" for v in stats["median_margin_all"])
    )
    print(f"not converged: {stats['num_not_converged_total']} of {margins.size} (subspace, sample) pairs")
    print(f"clean accuracy on these samples: {100.0 * correct / len(job.y):.1f}% ({correct}/{len(job.y)})")
    print(f"time: {seconds:.1f} s on {job.device}")
    print(f"results: {job.output_dir.resolve()}")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


INPUT_ERRORS = (InputError, OSError, ValueError, TypeError, pickle.UnpicklingError)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 2 bad input, 1 failure during the run)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        torch.manual_seed(args.seed)
        job = prepare(args, argv)
    except INPUT_ERRORS as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        run(job, progress=not args.no_progress)
    except (OSError, ValueError) as err:  # e.g. non-finite margins or a full disk: nothing was written
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
