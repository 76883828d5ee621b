"""Measure the margins of a trained network along DCT frequency subspaces (or the full input space).

Margin of a sample along a subspace: L2 norm of the smallest perturbation inside it that changes the predicted
label, estimated with subspace-constrained DeepFool (overshoot 0.02, 100 iterations, top-10 candidates). Defaults
reproduce the paper: 100 test samples drawn with seed 0; DCT blocks 8/1 (MNIST), 8/2 (CIFAR-10), 16/16 (ImageNet).

    python evaluate_margin.py --checkpoint logs/mnist_lenet/version_0/checkpoints/last.ckpt
    python evaluate_margin.py --model lenet --dataset mnist --checkpoint model.t7 --data-dir data
    python evaluate_margin.py --model resnet50 --dataset imagenet --checkpoint imagenet_l2_3_0.pt \\
        --trusted-pickle --data-dir /path/imagenet --accelerator gpu --devices 4
    torchrun --nproc-per-node 4 evaluate_margin.py --checkpoint last.ckpt --accelerator gpu

Writes --output-dir (default outputs/margins/<model>_<dataset>[_<transform>]_<run>[_<estimator>], no suffix for
DeepFool): margins.npy float32 [S, N], converged.npy, iterations.npy, perturbed_labels.npy [S, N], indices.npy,
predicted.npy, targets.npy [N], summary.json, margins.png; chunks/ holds the committed chunks: re-running an
interrupted command resumes.
Bad input: one line `error: ...`, exit 2. Stopped by SIGINT (Ctrl-C), SIGUSR1 or SIGTERM: one line `stopped: ...`,
exit 130, 138 or 143 (a lost process: 3); rerun the same command to resume. Anything else is a bug: traceback,
exit 1. Library: margins.run.evaluate.
"""

# ruff: noqa: E402 - the stop signals are handled before the imports below, which take seconds
from __future__ import annotations

from common.stop import CommandExit, RunStopped, modules_loading

# a signal while the modules load: its exit code and line, not a bare kill
with modules_loading(__name__ == "__main__"):
    import argparse
    import gc
    import logging
    import sys
    import warnings
    from pathlib import Path

    from cli.margin_flags import (
        add_attack_arguments,
        add_run_arguments,
        add_sample_arguments,
        add_source_arguments,
        add_subspace_arguments,
        attack_from_args,
        deprecated,
        input_error,
        rows_from_args,
        run_from_args,
        source_from_args,
    )
    from cli.parser import ArgumentParser
    from common.errors import InputError
    from margins.inputs import load_model_and_data
    from margins.run.evaluate import evaluate_margins
    from margins.store.names import bound, estimator_of, quantity
    from margins.store.results import MarginReport, summarize, time_line

__all__ = ["build_parser", "load_model_and_data", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="evaluate_margin.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_source_arguments(p)
    add_sample_arguments(p)
    p.add_argument("--subspace", choices=("dct", "full"), default="dct", help="DCT blocks, or the full space (1 row)")
    add_subspace_arguments(p)
    add_attack_arguments(p)
    p.add_argument(
        "--batch-size", dest="chunk_rows", type=int, action=deprecated("--chunk-rows", int), help=argparse.SUPPRESS
    )
    add_run_arguments(p, "outputs/margins/<model>_<dataset>_<transform>_<run>[_<estimator>]")
    return p


def run(args: argparse.Namespace, argv: list[str]) -> tuple[MarginReport | None, Path]:
    return evaluate_margins(
        source_from_args(args), rows=rows_from_args(args), attack=attack_from_args(args), run=run_from_args(args),
        output_dir=args.output_dir, command=["evaluate_margin.py", *argv],
    )  # fmt: skip


def print_summary(report: MarginReport, folder: Path) -> None:
    s, stats = report.settings, summarize(report.margins, report.converged)
    space = f"{s['num_subspaces']} subspaces" if s["subspace"] != "full" else "the full input space"
    correct = int((report.predicted == report.targets).sum())
    estimator = estimator_of(s)
    what = "on the margin" if bound(estimator) == "lower" else f"({bound(estimator)} bounds on the margin)"
    print(f"{s['model']['net']} on {s['dataset']}: {s['num_samples']} samples, {space}, {quantity(estimator)}s {what}")
    print(
        f"median {quantity(estimator)} per subspace (low -> high frequency): "
        + " ".join(f"{v:.3g}" for v in stats["median_margin_all"])
    )
    missed = f"{stats['num_not_converged_total']} of {report.margins.size} (subspace, sample) pairs"
    if bound(estimator) == "lower":  # the certifier's `converged`: its upper-bound attack changed the label
        print(f"no label change found by the upper-bound attack (no interval): {missed}")
    else:
        print(f"not converged: {missed}")
    total = len(report.targets)
    print(f"clean accuracy on these samples: {100.0 * correct / total:.1f}% ({correct}/{total})")
    print(time_line(report))
    print(f"results: {folder.resolve()}")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 2 bad input, 3 a process lost, 130/138/143 stopped
    by SIGINT/SIGUSR1/SIGTERM: `margins.run.guard.EXIT_CODES`). Other errors propagate (exit 1)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.filterwarnings("ignore", message=r".*(LeafSpec|does not have many workers).*")
    for name in ("lightning.pytorch", "lightning.fabric"):  # no "GPU available" banners
        logging.getLogger(name).setLevel(logging.WARNING)
    with CommandExit() as command:
        try:
            args = build_parser().parse_args(argv)
            report, folder = run(args, argv)
            if report is not None:
                print_summary(report, folder)
        except InputError as err:
            return input_error(err)
        except RunStopped as stop:
            return command.stopped(stop)
    return 0


if __name__ == "__main__":
    status = main()
    gc.freeze()  # the process ends: what it built is not collected on the way out (seconds on a busy machine)
    sys.exit(status)
