"""The command-line vocabulary of every margin command (evaluate_margin.py, frequency_analysis.py): one flag for
one thing, added by the same functions, read back into the same settings objects (`margins.settings`: a flag's
name is its field's).

- model and data: --checkpoint --model --dataset --transform --bandwidth --data-dir --num-classes --trusted-pickle
- samples: --num-samples --seed --indices-file
- subspaces: --subspace-dim --subspace-step (frequency_analysis.py random: --count --subspace-seed --method --bases)
- attack: --estimator --max-iter --overshoot --num-candidates --fmn-steps --certify-method --chunk-rows --dtype
  --kernels
- processes and output: --accelerator --devices --num-nodes --strategy --num-workers --threads
  --return-freed-memory --output-dir --overwrite --no-progress
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from typing import Any

from common.errors import InputError
from datamodules import DATASETS, TRANSFORMS
from margins.inputs import ModelSource
from margins.run.guard import EXIT_BAD_INPUT, STOPPED, env_rank
from margins.settings import (
    CERTIFY_METHODS,
    DEFAULT_CHUNK_ROWS,
    DEFAULT_NUM_SAMPLES,
    DTYPES,
    ESTIMATORS,
    SMALL_CHUNK_ROWS,
    AttackSettings,
    RowSettings,
    RunSettings,
    default_threads,
)
from models import MODEL_NAMES


def add_source_arguments(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--checkpoint", required=True, help="model.t7 / .pth state_dict, Lightning .ckpt, MadryLab .pt")
    a("--model", choices=MODEL_NAMES, help="zoo architecture (default: from the checkpoint)")
    a("--dataset", choices=tuple(DATASETS), help="dataset (default: from the checkpoint)")
    a("--transform", choices=TRANSFORMS, help="frequency transform of the data (default: the checkpoint's, or none)")
    a("--bandwidth", type=int, help="block side of low_pass/high_pass (default 16)")
    a("--data-dir", help="dataset directory (default: the checkpoint's, else 'data')")
    a("--num-classes", type=int, help="classes of a raw state_dict's model (default: the dataset's)")
    a("--trusted-pickle", action="store_true", help="allow pickled objects (MadryLab); ONLY for files you trust")


def add_sample_arguments(p: argparse.ArgumentParser, default_samples: int = DEFAULT_NUM_SAMPLES) -> None:
    a = p.add_argument
    a("--num-samples", type=int, default=default_samples, help=f"test samples drawn at random ({default_samples})")
    a("--seed", type=int, default=0, help="seed of the draw (default 0)")
    a("--indices-file", help="FILE.npy of dataset indices to evaluate, in order (overrides the draw)")
    a("--indices", dest="indices_file", action=deprecated("--indices-file"), help=argparse.SUPPRESS)


def add_subspace_arguments(p: argparse.ArgumentParser, step_help: str = "DCT block step") -> None:
    a = p.add_argument
    a("--subspace-dim", type=int, help="DCT block side k (default per dataset: 8 MNIST, 8 CIFAR-10, 16 ImageNet)")
    a("--subspace-step", type=int, help=f"{step_help} (default per dataset: 1, 2, 16)")


def add_attack_arguments(p: argparse.ArgumentParser) -> None:
    """The estimator's flags; each default is `AttackSettings`' field default."""
    a, d = p.add_argument, AttackSettings
    a("--max-iter", type=int, default=d.max_iter, help=f"DeepFool iterations per row (default {d.max_iter})")
    a("--overshoot", type=float, default=d.overshoot, help=f"overshoot (default {d.overshoot})")
    a(
        "--chunk-rows",
        type=int,
        help=f"(sample, subspace) rows per chunk: memory and resume unit ({SMALL_CHUNK_ROWS} for ImageNet or certify, "
        f"else {DEFAULT_CHUNK_ROWS})",
    )
    a("--dtype", choices=tuple(DTYPES), help="precision (default float32; float64 for --estimator certify)")
    a("--kernels", choices=("auto", "off"), default=d.kernels, help=f"the engine's CPU kernels (default {d.kernels})")
    a(
        "--estimator",
        choices=ESTIMATORS,
        default=d.estimator,
        help="deepfool (the paper's) or fmn: attacks, margins that are upper bounds; certify: certified lower bounds",
    )
    a("--num-candidates", type=int, default=d.num_candidates,
      help=f"classes DeepFool (and FMN's first step) linearise (default {d.num_candidates})")  # fmt: skip
    a("--fmn-steps", type=int, default=d.fmn_steps, help=f"FMN steps per row (default {d.fmn_steps})")
    a("--certify-method", choices=CERTIFY_METHODS, default=d.certify_method,
      help=f"the certifier's bounds (default {d.certify_method})")  # fmt: skip


def add_run_arguments(p: argparse.ArgumentParser, default_output: str) -> None:
    """The process and output flags; each default is `RunSettings`' field default."""
    a, d = p.add_argument, RunSettings
    a("--accelerator", default=d.accelerator, help=f"Lightning accelerator: cpu, gpu, auto (default {d.accelerator})")
    a("--devices", help="devices (processes) per node (default 1; under torchrun: its nproc-per-node)")
    a("--num-nodes", type=int, help="nodes (default 1; under torchrun: from its environment)")
    a("--strategy", default=d.strategy, help=f"Lightning strategy: auto, ddp, ddp_spawn, ... (default {d.strategy})")
    a("--num-workers", type=int, default=d.num_workers,
      help=f"DataLoader workers reading samples (default {d.num_workers})")  # fmt: skip
    a("--threads", type=int, default=d.threads,
      help="CPU threads per process (default: the cores this process may use shared among the processes on this "
      f"node, {default_threads(1)} here for one process: fastest on idle cores, docs/ENGINE.md; on cores shared with "
      "other jobs --threads 1 measured fastest; float bits depend on it: give the same value to compare runs bit for "
      "bit)")  # fmt: skip
    a(
        "--return-freed-memory",
        action="store_true",
        help="let malloc hand freed blocks back to the OS at once (glibc's default; slower on large models)",
    )
    a("--output-dir", help=f"result folder (default {default_output})")
    a("--overwrite", action="store_true", help="discard an earlier result (finished or not) in --output-dir")
    a("--no-progress", action="store_true", help="no progress bar")


def deprecated(new: str, convert: Callable[[str], Any] = str) -> type[argparse.Action]:
    """An argparse action for an old flag name: stores into the new flag's destination and prints one line."""

    class Deprecated(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"warning: {option_string} is deprecated, use {new}", file=sys.stderr)
            setattr(namespace, self.dest, convert(values))

    return Deprecated


def source_from_args(args: argparse.Namespace) -> ModelSource:
    return ModelSource(
        args.checkpoint, args.model, args.dataset, args.transform, args.bandwidth, args.data_dir,
        args.num_classes, args.trusted_pickle,
    )  # fmt: skip


def rows_from_args(args: argparse.Namespace, subspace: str | None = None) -> RowSettings:
    """The rows the flags name (`subspace`: the family's kind where the command sets it); flags a command does
    not have keep `RowSettings`' defaults."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(RowSettings) if hasattr(args, f.name)}
    if subspace is not None:
        given["subspace"] = subspace
    given["bases"] = tuple(given.get("bases") or ())
    return RowSettings(**given)


def attack_from_args(args: argparse.Namespace) -> AttackSettings:
    """The estimator's settings the flags name (each flag's destination is its field's name)."""
    return AttackSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(AttackSettings)})


def run_from_args(args: argparse.Namespace) -> RunSettings:
    return RunSettings(
        args.accelerator, devices(args.devices), args.num_nodes, args.strategy, args.num_workers, args.overwrite,
        not args.no_progress, args.threads, keep_freed_memory=not args.return_freed_memory,
    )  # fmt: skip


def devices(value: str | None) -> int | str | None:
    """`--devices`: a count, a list like 0,1, 'auto' or -1 (all)."""
    if value is None or value in ("auto", "-1") or "," in value:
        return value
    try:
        return int(value)
    except ValueError:
        raise InputError(f"--devices {value!r} is not a number, a list like 0,1 or 'auto'") from None


def input_error(err: InputError) -> int:
    """Print `error: ...` for a user's error (one line, on the main process; another rank prints it only when it
    could not hand it to the main process through the run's stop file) and return the exit status 2."""
    if env_rank() == 0 or not STOPPED:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
    return EXIT_BAD_INPUT
