"""Measure the margins of a trained network along DCT frequency subspaces (or the full input space).

Margin of a sample along a subspace: L2 norm of the smallest perturbation inside it that changes the predicted
label, estimated with subspace-constrained DeepFool (overshoot 0.02, 100 iterations, top-10 candidates). Defaults
reproduce the paper: 100 test samples drawn with seed 0; DCT blocks 8/1 (MNIST), 8/2 (CIFAR-10), 16/16 (ImageNet).

    python evaluate_margin.py --checkpoint logs/mnist_lenet/version_0/checkpoints/last.ckpt
    python evaluate_margin.py --model lenet --dataset mnist --checkpoint model.t7 --data-dir data
    python evaluate_margin.py --model resnet50 --dataset imagenet --checkpoint imagenet_l2_3_0.pt \\
        --trusted-pickle --data-dir /path/imagenet --accelerator gpu --devices 4
    torchrun --nproc-per-node 4 evaluate_margin.py --checkpoint last.ckpt --accelerator gpu

Writes --output-dir (default outputs/margins/<model>_<dataset>[_<transform>]_<run>): margins.npy float32 [S, N],
converged.npy, iterations.npy, perturbed_labels.npy [S, N], indices.npy, predicted.npy, targets.npy [N],
summary.json, margins.png; chunks/ holds the committed chunks: re-running an interrupted command resumes.
Bad input: one line `error: ...`, exit 2. Anything else is a bug: traceback, exit 1. Library: margins.evaluate.
"""

from __future__ import annotations

import gc

if __name__ == "__main__":  # a command: no cyclic collections while torch & co. are imported (see the end)
    gc.disable()

import argparse
import logging
import sys
import warnings

from common.cli import ArgumentParser
from common.errors import InputError
from datamodules import DATA, TRANSFORMS
from margins.evaluate import DTYPES, AttackSettings, RunSettings, evaluate_margins
from margins.inputs import ModelSource, load_model_and_data
from margins.results import MarginReport, summarize
from models import MODEL_NAMES

__all__ = ["build_parser", "load_model_and_data", "main"]
EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="evaluate_margin.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    a = p.add_argument
    a("--checkpoint", required=True, help="model.t7 / .pth state_dict, Lightning .ckpt, MadryLab .pt")
    a("--model", choices=MODEL_NAMES, help="zoo architecture (default: from the checkpoint)")
    a("--dataset", choices=tuple(DATA), help="dataset (default: from the checkpoint)")
    a("--transform", choices=TRANSFORMS, help="frequency transform of the data (default: the checkpoint's, or none)")
    a("--bandwidth", type=int, help="block side of low_pass/high_pass (default 16)")
    a("--data-dir", help="dataset directory (default: the checkpoint's, else 'data')")
    a("--num-classes", type=int, help="classes of a raw state_dict's model (default: the dataset's)")
    a("--trusted-pickle", action="store_true", help="allow pickled objects (MadryLab); ONLY for files you trust")
    a("--num-samples", type=int, default=100, help="test samples drawn at random (default 100)")
    a("--seed", type=int, default=0, help="seed of the draw (default 0)")
    a("--indices", help="FILE.npy of dataset indices to evaluate, in order (overrides the draw)")
    a("--subspace", choices=("dct", "full"), default="dct", help="DCT blocks, or the full space (1 row)")
    a("--subspace-dim", type=int, help="DCT block side k (default per dataset: 8, 8, 16)")
    a("--subspace-step", type=int, help="DCT block step (default per dataset: 1, 2, 16)")
    a("--max-iter", type=int, default=100, help="DeepFool iterations per row (default 100)")
    a("--overshoot", type=float, default=0.02, help="overshoot (default 0.02)")
    a("--chunk-rows", "--batch-size", type=int, help="rows per chunk: memory and resume unit (64 ImageNet, else 512)")
    a("--dtype", choices=tuple(DTYPES), default="float32", help="attack precision (default float32)")
    a("--channels-last", action="store_true", help="channels-last model: faster for deep CNNs (ResNet-50) on CPU")
    a("--accelerator", default="auto", help="Lightning accelerator: cpu, gpu, auto (default)")
    a("--devices", help="devices (processes) per node (default 1; under torchrun: its nproc-per-node)")
    a("--num-nodes", type=int, help="nodes (default 1; under torchrun: from its environment)")
    a("--strategy", default="auto", help="Lightning strategy: auto, ddp, ddp_spawn, ... (default auto)")
    a("--num-workers", type=int, default=0, help="DataLoader workers reading samples (default 0)")
    a("--threads", type=int, default=1, help="CPU threads per process (default 1; on CPU use --devices to scale)")
    a(
        "--return-freed-memory",
        action="store_true",
        help="let malloc hand freed blocks back to the OS at once (glibc's default; slower: page faults)",
    )
    a("--output-dir", help="result folder (default outputs/margins/<model>_<dataset>_<transform>_<run>)")
    a("--overwrite", action="store_true", help="discard an earlier evaluation (finished or not) in --output-dir")
    a("--no-progress", action="store_true", help="no progress bar")
    return p


def _devices(value: str | None) -> int | str | None:
    if value is None or value in ("auto", "-1") or "," in value:
        return value
    try:
        return int(value)
    except ValueError:
        raise InputError(f"--devices {value!r} is not a number, a list like 0,1 or 'auto'") from None


def run(args: argparse.Namespace, argv: list[str]) -> tuple[MarginReport | None, object]:
    source = ModelSource(
        args.checkpoint, args.model, args.dataset, args.transform, args.bandwidth, args.data_dir,
        args.num_classes, args.trusted_pickle,
    )  # fmt: skip
    attack = AttackSettings(
        args.overshoot, args.max_iter, chunk_rows=args.chunk_rows, dtype=args.dtype, channels_last=args.channels_last
    )
    runs = RunSettings(
        args.accelerator, _devices(args.devices), args.num_nodes, args.strategy, args.num_workers,
        args.overwrite, not args.no_progress, args.threads, keep_freed_memory=not args.return_freed_memory,
    )  # fmt: skip
    return evaluate_margins(
        source, num_samples=args.num_samples, seed=args.seed, output_dir=args.output_dir, attack=attack, run=runs,
        subspace=args.subspace, subspace_dim=args.subspace_dim, subspace_step=args.subspace_step,
        indices_file=args.indices, command=["evaluate_margin.py", *argv],
    )  # fmt: skip


def print_summary(report: MarginReport, folder: object) -> None:
    s, stats = report.settings, summarize(report.margins, report.converged)
    space = f"{s['num_subspaces']} subspaces" if s["subspace"] == "dct" else "the full input space"
    correct = int((report.predicted == report.targets).sum())
    print(f"{s['model']['net']} on {s['dataset']}: {s['num_samples']} samples, {space}")
    print(
        "median margin per subspace (low -> high frequency): "
        + " ".join(f"{v:.3g}" for v in stats["median_margin_all"])
    )
    print(f"not converged: {stats['num_not_converged_total']} of {report.margins.size} (subspace, sample) pairs")
    total = len(report.targets)
    print(f"clean accuracy on these samples: {100.0 * correct / total:.1f}% ({correct}/{total})")
    print(f"time: {report.extra['seconds']:.1f} s on {s['device_type']} ({s['dtype']})")
    print(f"results: {folder.resolve()}")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 2 bad input). Other errors propagate (exit 1)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for name in ("lightning.pytorch", "lightning.fabric"):  # no "GPU available" banners
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*(LeafSpec|does not have many workers).*")
    try:
        args = build_parser().parse_args(argv)
        report, folder = run(args, argv)
    except InputError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if report is not None:
        print_summary(report, folder)
    return 0


if __name__ == "__main__":
    # The imported modules (torch alone: about 180,000 tracked objects) live until exit. The collector was off
    # while they were imported (about 0.2 s of collections); freezing them keeps it from walking them during the
    # run and in the interpreter's final collections (about 1 s of teardown otherwise). Frozen again after the
    # run for what it imported lazily (matplotlib).
    gc.freeze()
    gc.enable()
    status = main()
    gc.freeze()
    sys.exit(status)
