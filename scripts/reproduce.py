"""Reproduce the paper's experiments on one dataset: train each model from its config (or take given checkpoints),
measure its margins with evaluate_margin.py, and write a results page with the paper's claims beside the measured
values (docs/RESULTS.md for MNIST, docs/RESULTS-<dataset>.md otherwise, with --docs; always <out>/RESULTS-<dataset>.md).

    python scripts/reproduce.py --dataset mnist --data-dir ../shared/data --docs
    python scripts/reproduce.py --dataset cifar10 --data-dir /datasets --only cifar10_resnet18 cifar10_flipped_resnet18
    python scripts/reproduce.py --dataset imagenet --data-dir /datasets/imagenet \\
        --checkpoint imagenet_robust_resnet50=imagenet_l2_3_0.pt --margin-args=--trusted-pickle

On a cluster, one job per experiment instead of running here (then, when the jobs are done, --collect writes the page
from their result folders):

    python scripts/reproduce.py --dataset cifar10 --data-dir /datasets --out runs/cifar10 --emit sbatch --gpus 4
    sbatch runs/cifar10/jobs/cifar10.sbatch          # a SLURM array, one task per experiment, requeue-safe
    python scripts/reproduce.py --dataset cifar10 --out runs/cifar10 --collect

Per experiment: <out>/logs/<experiment>/reproduce/ (training; a rerun resumes from its last.ckpt, a finished training
is not repeated), <out>/margins/<experiment>/ (evaluate_margin.py's result folder). Then <out>/summary.json,
<out>/<dataset>_margins.png and the page. A training prints a line per epoch (train loss, validation loss and accuracy,
seconds; `callbacks.EpochLine`); SIGTERM or Ctrl-C ends the running child and prints the command that resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
IN_CLONE = (REPO / "pyproject.toml").is_file() and (REPO / "train.py").is_file()
PROGRAM = "python scripts/reproduce.py" if IN_CLONE else "hmt-reproduce"  # how the user runs this script
sys.path.insert(0, str(REPO))  # run as a file from a clone: the project's packages

from callbacks.epoch_line import LINE as EPOCH_LINE  # noqa: E402
from configs import config_path  # noqa: E402
from margins import read_report  # noqa: E402
from margins.settings import DEFAULT_NUM_SAMPLES  # noqa: E402
from plotting.margins import describe_run, grid_shape, panel_axes, plot_margins, shared_legend  # noqa: E402
from scripts.results_doc import band_medians, claim_values, render  # noqa: E402

NETS = {"lenet": "LeNet", "resnet18": "ResNet-18", "vgg19": "VGG-19", "densenet121": "DenseNet-121",
        "resnet50": "ResNet-50"}  # fmt: skip
LABELS = {"mnist": "MNIST", "cifar10": "CIFAR-10", "imagenet": "ImageNet"}


@dataclass
class Experiment:
    name: str  # config name in configs/, unless `config` is given; also the name of its logs and margins folders
    title: str
    net: str
    kind: str  # standard, flipped, lowpass, robust, flipped_robust, flipped_robust_dykstra, synthetic
    dataset: str  # the datamodule's name
    transform: str
    pgd_eps: float  # L2 PGD radius of the accuracy check (the dataset's adversarial training radius)
    robust: bool = False
    flipped: bool = False
    synthetic: bool = False
    config: str = ""  # the config's name where it differs from `name`: a variant of that config, by `overrides`
    overrides: list[str] = field(default_factory=list)  # train.py flags of the variant
    panel_note: str = ""  # what sets it apart from another panel of the same model and data, in the figure

    @property
    def config_name(self) -> str:
        return self.config or self.name


KINDS = {  # kind: (config infix, transform, title prefix, title suffix)
    "standard": ("", "none", "", ""),
    "flipped": ("flipped_", "flip", "Flipped ", ""),
    "lowpass": ("lowpass_", "low_pass", "Low-pass ", ""),
    "robust": ("robust_", "none", "", ", L2 PGD eps={eps:g}"),
    "flipped_robust": ("flipped_robust_", "flip", "Flipped ", ", L2 PGD eps={eps:g} (exact projection)"),
    "flipped_robust_dykstra": ("flipped_robust_", "flip", "Flipped ", ", L2 PGD eps={eps:g} (Dykstra, the release's)"),
}
VARIANTS = {  # kind: (suffix of the experiment's name after its config's name, train.py flags)
    "flipped_robust_dykstra": ("_dykstra", ["--model.init_args.projection", "dykstra"]),
}
PANEL_NOTES = {"flipped_robust": "exact projection", "flipped_robust_dykstra": "Dykstra's projection"}


def experiment(dataset: str, kind: str, net: str, eps: float, lowpass: str = "") -> Experiment:
    infix, transform, prefix, suffix = KINDS[kind]
    label = f"{LABELS[dataset]}{lowpass if kind == 'lowpass' else ''}"
    title = f"{prefix}{label}, {NETS[net]}{suffix.format(eps=eps)}"
    config = f"{dataset}_{infix}{net}"
    name_suffix, overrides = VARIANTS.get(kind, ("", []))
    return Experiment(f"{config}{name_suffix}", title, net, kind, dataset, transform, eps, robust="robust" in kind,
                      flipped=kind.startswith("flipped"), config=config if name_suffix else "",
                      overrides=list(overrides), panel_note=PANEL_NOTES.get(kind, ""))  # fmt: skip


def experiments(dataset: str) -> list[Experiment]:
    """The dataset's experiment set, in the order of the results page."""
    if dataset == "mnist":
        # the flipped robust LeNet twice: projected in closed form (the config's default) and, as the release did,
        # by Dykstra's algorithm
        kinds = ("standard", "flipped", "lowpass", "robust", "flipped_robust", "flipped_robust_dykstra")
        out = [experiment("mnist", k, "lenet", 2.0, " (14x14)") for k in kinds]
        synthetic = Experiment("synthetic_lenet", "Synthetic (one DCT direction), LeNet", "lenet", "synthetic",
                               "synthetic", "none", 1.0, synthetic=True)  # fmt: skip
        return [*out, synthetic]
    if dataset == "cifar10":
        # no Dykstra variants: they would add three adversarial trainings of 30 epochs, each PGD step slower, to
        # compare two projections that agree to Dykstra's tolerance; MNIST makes that comparison
        kinds = ("standard", "flipped", "lowpass", "robust", "flipped_robust")
        return [
            experiment("cifar10", k, n, 1.0, " (16x16)") for n in ("resnet18", "vgg19", "densenet121") for k in kinds
        ]
    return [experiment("imagenet", k, "resnet50", 3.0) for k in ("standard", "flipped", "robust")]


QUICK_BATCHES, QUICK_ROBUST_BATCHES, QUICK_SYNTHETIC_EPOCHS = 120, 400, 4
QUICK_SAMPLES, QUICK_PGD_SAMPLES = 20, 250
QUICK_HELP = (
    f"short trainings: 1 epoch of at most {QUICK_BATCHES} batches per model ({QUICK_ROBUST_BATCHES} for an "
    f"adversarially trained one, each batch a 7-step PGD attack; synthetic data: {QUICK_SYNTHETIC_EPOCHS} epochs), "
    f"{QUICK_SAMPLES} margin samples, PGD accuracy on at most {QUICK_PGD_SAMPLES} test samples"
)
STOP_WAIT_S = 60  # after SIGTERM, seconds a child has to end (train.py: at its next batch) before SIGKILL
DEFAULTS = {  # dataset: (training epochs, None: the config's; PGD accuracy samples)
    "mnist": (10, 1000),
    "cifar10": (None, 0),
    "imagenet": (None, 0),
}


# ---- steps ---------------------------------------------------------------------------------------------------
def run(cmd: list[str], log: Path, args: argparse.Namespace, say: Callable[[str], None] = print) -> float:
    """`python -m <module> ...` in a subprocess with its output in `log` (or, with --in-process, in this process);
    its epoch lines (`callbacks.EpochLine`) are also passed to `say`. Raises with the log's tail on failure; the
    child is ended (SIGTERM, then SIGKILL after `STOP_WAIT_S`) when this process is interrupted. Returns seconds."""
    start = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    if args.in_process:
        code = _run_in_process(cmd)
        if code:
            raise RuntimeError(f"command failed ({code}): python -m {shlex.join(cmd)}")
        return time.perf_counter() - start
    with log.open("w") as handle:
        cwd = REPO if IN_CLONE else None
        proc = subprocess.Popen([sys.executable, "-m", *cmd], cwd=cwd, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)  # fmt: skip
        try:
            for line in proc.stdout:
                handle.write(line)
                if EPOCH_LINE.match(line):
                    say(line.rstrip())
            proc.wait()
        except BaseException:
            handle.write(end_child(proc))
            raise
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"command failed ({proc.returncode}): python -m {shlex.join(cmd)}\n{tail}")
    return time.perf_counter() - start


def end_child(proc: subprocess.Popen) -> str:
    """SIGTERM to a running child, SIGKILL if it has not ended `STOP_WAIT_S` seconds later; reads the rest of its
    output (so that a full pipe never blocks it) and waits for it. Returns that output."""
    if proc.poll() is None:
        proc.terminate()
    try:
        rest, _ = proc.communicate(timeout=STOP_WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        rest, _ = proc.communicate()
    return rest or ""


class Interrupted(Exception):
    """SIGTERM or SIGINT reached this process (`signum`)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM and SIGINT raise `Interrupted` in the main thread (a second one is ignored while the children end);
    the previous handlers are restored after the block. Elsewhere than the main thread: nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stops = (signal.SIGTERM, signal.SIGINT)

    def stop(signum: int, frame: object) -> None:
        for s in stops:
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, stop) for s in stops}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _run_in_process(cmd: list[str]) -> int:
    module, argv = cmd[0], cmd[1:]
    if module == "train":
        import train

        train.main(argv)
        return 0
    import evaluate_margin

    return evaluate_margin.main(argv)


def paths(exp: Experiment, out: Path) -> tuple[Path, Path]:
    """The experiment's trained checkpoint and its margin folder under `out`."""
    return out / "logs" / exp.name / "reproduce" / "checkpoints" / "last.ckpt", out / "margins" / exp.name


def train_command(exp: Experiment, args: argparse.Namespace) -> list[str]:
    """`train fit` of the experiment's config (with a variant's overrides) into <out>/logs/<name>/reproduce (resuming
    from its last.ckpt)."""
    cmd = [
        "train", "fit", "--config", str(config_path(exp.config_name)), "--data.data_dir", str(args.data_dir),
        "--trainer.logger.init_args.save_dir", str(args.out / "logs"), "--trainer.logger.init_args.name", exp.name,
        "--trainer.logger.init_args.version", "reproduce", "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks+=callbacks.EpochLine", "--seed_everything", str(args.seed), "--margin.enabled", "false",
        *exp.overrides,
    ]  # fmt: skip
    if args.epochs:
        cmd += ["--trainer.max_epochs", str(args.epochs)]
    if args.download:
        cmd += ["--data.download", "true"]
    if args.quick:  # adversarial training needs more steps before its margins exceed a standard model's
        batches = QUICK_ROBUST_BATCHES if exp.robust else QUICK_BATCHES
        cmd += ["--trainer.limit_train_batches", str(batches), "--trainer.limit_val_batches", "5"]
        if exp.synthetic:  # 79 batches an epoch: a few epochs to find the direction
            cmd += ["--trainer.max_epochs", str(QUICK_SYNTHETIC_EPOCHS)]
    return cmd + shlex.split(args.train_args)


def margin_command(exp: Experiment, ckpt: Path, args: argparse.Namespace) -> list[str]:
    """evaluate_margin on the experiment's checkpoint into <out>/margins/<name>; a given checkpoint gets the
    experiment's model, dataset and transform (a raw state_dict records none)."""
    _, folder = paths(exp, args.out)
    cmd = [
        "evaluate_margin", "--checkpoint", str(ckpt), "--data-dir", str(args.data_dir), "--num-samples",
        str(args.num_samples), "--seed", str(args.seed), "--output-dir", str(folder), "--no-progress",
    ]  # fmt: skip
    if exp.name in args.given:
        cmd += ["--model", exp.net, "--dataset", exp.dataset, "--transform", exp.transform]
    return cmd + shlex.split(args.margin_args)


def accuracies(
    exp: Experiment, ckpt: Path, args: argparse.Namespace, say: Callable[[str], None] = lambda text: None
) -> dict[str, float]:
    """Clean accuracy on the whole test split; accuracy under L2 PGD (20 steps) on its first `--robust-samples`,
    a line to `say` per batch of 250 attacked samples."""
    from attacks.pgd import L2PGD
    from margins.inputs import ModelSource, load_source

    source = ModelSource(ckpt, data_dir=str(args.data_dir), trusted_pickle="--trusted-pickle" in args.margin_args)
    if exp.name in args.given:
        source.model, source.dataset, source.transform = exp.net, exp.dataset, exp.transform
    loaded = load_source(source)
    model, dm = loaded.model, loaded.datamodule
    dataset = dm.margin_dataset()
    x_all = torch.stack([dataset[i][0] for i in range(len(dataset))])
    y_all = torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
    with torch.no_grad():
        predicted = torch.cat([model(x_all[i : i + 1000]).argmax(1) for i in range(0, len(x_all), 1000)])
    transform = dm.hparams.transform
    flipped = transform == "flip"
    # valid inputs: images in [0, 1] (after un-flipping for flipped data); filtered or synthetic data has no box
    projection = "exact" if flipped else "ball_box" if transform == "none" and dm.name != "synthetic" else "ball"
    attack = L2PGD(eps=exp.pgd_eps, steps=20, projection=projection, flipped=flipped,
                   generator=torch.Generator().manual_seed(0))  # fmt: skip
    n = min(args.robust_samples, len(x_all))
    robust = []
    for i in range(0, n, 250):
        x, y = x_all[i : min(i + 250, n)], y_all[i : min(i + 250, n)]
        with torch.no_grad():
            robust.append(model(attack(model, x, y)).argmax(1) == y)
        say(f"L2 PGD accuracy: {min(i + 250, n)}/{n} samples attacked")
    return {
        "clean_accuracy": float((predicted == y_all).float().mean()),
        "pgd_eps": exp.pgd_eps,
        "pgd_accuracy": float(torch.cat(robust).float().mean()),
        "pgd_samples": n,
        "test_samples": len(x_all),
    }


def measured(exp: Experiment, ckpt: Path, folder: Path) -> dict:
    """What the page needs of a margin folder."""
    saved = read_report(folder)
    low, high = band_medians(saved.margins)
    s = saved.settings
    block, step, count = s.get("subspace_dim"), s.get("subspace_step"), saved.margins.shape[0]
    known = saved.predicted is not None and saved.targets is not None
    return {
        **asdict(exp),
        "checkpoint": str(ckpt),
        "margin_dir": str(folder),
        "margin_seconds": saved.extra.get("seconds"),
        "margin_samples": int(saved.margins.shape[1]),
        "sample_accuracy": float(np.mean(saved.predicted == saved.targets)) if known else None,
        "median_margin": saved.stats["median_margin_all"],
        "not_converged": saved.stats["num_not_converged_total"],
        "low_band_median": low,
        "high_band_median": high,
        "subspaces": f"{count} subspaces: {block}x{block} blocks, step {step}, of {_shape(s)} images",
        "attack": attack_text(s),
        "device": s.get("device_type", "cpu"),
    }


def attack_text(settings: dict) -> str:
    """The margin estimator and its settings as a margin folder records them."""
    estimator = settings.get("estimator", "deepfool")
    if estimator != "deepfool":
        options = settings.get("estimator_settings", {})
        return f"{estimator} ({', '.join(f'{k} {v}' for k, v in options.items() if k != 'estimator')})"
    overshoot, max_iter = settings.get("overshoot"), settings.get("max_iter")
    release = " (the release's settings)" if (overshoot, max_iter) == (0.02, 100) else ""
    return f"subspace-constrained DeepFool, overshoot {overshoot}, at most {max_iter} iterations{release}"


def _shape(settings: dict) -> str:
    model = settings.get("model")
    shape = model.get("image_shape") if isinstance(model, dict) else None
    return "x".join(str(v) for v in shape) if shape else "the dataset's"


# ---- the experiment set --------------------------------------------------------------------------------------
def run_experiment(exp: Experiment, args: argparse.Namespace, clock: float) -> dict:
    """Train (unless given), measure, and (with --robust-samples) test accuracies; the experiment's summary."""
    ckpt, folder = paths(exp, args.out)

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - clock:7.0f} s] {exp.name}: {text}", flush=True)

    train_seconds = None
    if exp.name in args.given:
        ckpt = args.given[exp.name]
    else:
        log = args.out / "logs" / f"{exp.name}_fit.log"
        say(f"training (log: {log})")
        cmd = train_command(exp, args)
        if ckpt.is_file():  # an earlier run of this command: resume (a finished training ends at once)
            cmd += ["--ckpt_path", str(ckpt)]
        train_seconds = run(cmd, log, args, say)
    log = args.out / "logs" / f"{exp.name}_margins.log"
    say(f"margins of {args.num_samples} test samples (log: {log})")
    # --overwrite: the model may have been retrained since an earlier measurement in this folder
    run([*margin_command(exp, ckpt, args), "--overwrite"], log, args, say)
    record = NOT_RECORDED if exp.name in args.given else training_record(ckpt)
    result = {**measured(exp, ckpt, folder), "train_seconds": train_seconds, **record}
    result["trained_by"] = "given checkpoint" if exp.name in args.given else "this run"
    if args.robust_samples > 0:
        say(f"clean accuracy on the test split, L2 PGD accuracy (eps {exp.pgd_eps:g}) on {args.robust_samples} samples")
        result.update(accuracies(exp, ckpt, args, say))
    say(f"low/high median margin {result['low_band_median']:.3g}/{result['high_band_median']:.3g}")
    return result


NOT_RECORDED = {"trained_epochs": None, "trained_steps": None, "trained_batch_size": None}  # trained elsewhere


def training_record(ckpt: Path) -> dict:
    """What the Lightning checkpoint of a training of this reproduction says of it: `trained_epochs` (epochs begun,
    the last one possibly cut short by a step limit), `trained_steps` (optimizer steps) and `trained_batch_size`
    (per device); not recorded where the
    checkpoint is not here (a cluster job's, on another file system)."""
    if not Path(ckpt).is_file():
        return NOT_RECORDED
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)  # written by this project's train.py
    data = saved.get("datamodule_hyper_parameters") or {}
    return {"trained_epochs": int(saved["epoch"]) + 1, "trained_steps": int(saved["global_step"]),
            "trained_batch_size": data.get("batch_size")}  # fmt: skip


def collect(exp: Experiment, args: argparse.Namespace) -> dict | None:
    """The summary of an experiment measured by a cluster job (None, with a note, where its folder is missing)."""
    ckpt, folder = paths(exp, args.out)
    ckpt = args.given.get(exp.name, ckpt)
    try:
        result = measured(exp, ckpt, folder)
    except (FileNotFoundError, ValueError) as err:
        print(f"{exp.name}: skipped, no finished margins ({' '.join(str(err).split())})", file=sys.stderr)
        return None
    result.update(train_seconds=None, trained_by="given checkpoint" if exp.name in args.given else "cluster job")
    result.update(NOT_RECORDED if exp.name in args.given else training_record(ckpt))
    if args.robust_samples > 0:
        result.update(accuracies(exp, ckpt, args))
    return result


# ---- cluster jobs --------------------------------------------------------------------------------------------
def job_commands(exp: Experiment, args: argparse.Namespace, launcher: str) -> list[str]:
    """Shell lines of one experiment's job: train (resuming after a requeue) unless given, then measure."""
    gpus = args.gpus
    ckpt, _ = paths(exp, args.out)
    ckpt = args.given.get(exp.name, ckpt)
    train_gpu = ["--trainer.accelerator", "gpu", "--trainer.devices", str(gpus)]
    train_gpu += ["--trainer.strategy", "ddp"] if gpus > 1 else []
    margin_gpu = ["--accelerator", "gpu"] + (["--devices", str(gpus)] if launcher == "srun" else [])
    lines = []
    if exp.name not in args.given:
        lines += [
            f"CKPT={shlex.quote(str(ckpt))}",
            'RESUME=(); if [ -f "$CKPT" ]; then RESUME=(--ckpt_path "$CKPT"); fi',
        ]
        lines.append(f"{launch(launcher, gpus, train_command(exp, args) + train_gpu)} " + '${RESUME[@]+"${RESUME[@]}"}')
    lines.append(launch(launcher, gpus, margin_command(exp, ckpt, args) + margin_gpu))
    return lines


def launch(launcher: str, gpus: int, cmd: list[str]) -> str:
    """`srun $PYTHON -m ...` (SLURM) or `torchrun ... -m ...` for `cmd` = [module, *arguments]."""
    if launcher == "srun":
        return f"srun $PYTHON -m {shlex.join(cmd)}"
    return f"$PYTHON -m torch.distributed.run --standalone --nproc-per-node {gpus} -m {shlex.join(cmd)}"


def emit(chosen: list[Experiment], args: argparse.Namespace) -> Path:
    """Write the job script (sbatch array or torchrun lines) under <out>/jobs; returns its path."""
    jobs = args.out / "jobs"
    jobs.mkdir(parents=True, exist_ok=True)
    workdir = shlex.quote(str(REPO if IN_CLONE else Path.cwd()))
    collect_cmd = f"{PROGRAM} --dataset {args.dataset} --out {args.out} --collect"
    head = [
        "#!/bin/bash",
        f"# {PROGRAM} --dataset {args.dataset}: one job per experiment ({len(chosen)}). When all are done:",
        f"#   {collect_cmd}",
    ]
    if args.emit == "sbatch":
        head += [
            f"#SBATCH --job-name=hmt-{args.dataset}", f"#SBATCH --array=0-{len(chosen) - 1}", "#SBATCH --nodes=1",
            f"#SBATCH --ntasks-per-node={args.gpus}", f"#SBATCH --gres=gpu:{args.gpus}", "#SBATCH --cpus-per-task=8",
            f"#SBATCH --time={args.time}", "#SBATCH --signal=SIGUSR1@90", "#SBATCH --requeue",
            "#SBATCH --open-mode=append", f"#SBATCH --output={jobs}/%x_%A_%a.log",
        ]  # fmt: skip
    body = ["set -euo pipefail", f"cd {workdir}", f"PYTHON=${{PYTHON:-{shlex.quote(sys.executable)}}}", ""]
    if args.emit == "sbatch":
        body.append('case "$SLURM_ARRAY_TASK_ID" in')
        for i, exp in enumerate(chosen):
            body += [f"  {i})  # {exp.name}"] + [f"    {line}" for line in job_commands(exp, args, "srun")] + ["    ;;"]
        body.append("esac")
        path = jobs / f"{args.dataset}.sbatch"
    else:
        for exp in chosen:
            body += [f"# {exp.name}", *job_commands(exp, args, "torchrun"), ""]
        path = jobs / f"{args.dataset}_torchrun.sh"
    path.write_text("\n".join(head + body) + "\n")
    path.chmod(0o755)
    print(f"{len(chosen)} jobs: {path}\nwhen they are done: {collect_cmd}")
    return path


# ---- results -------------------------------------------------------------------------------------------------
def figure(results: dict, path: Path) -> int:
    """The paper-style panels, one per experiment (no blank panel), one legend below; returns the panel count."""
    from matplotlib.figure import Figure

    names = list(results)
    rows, columns = grid_shape(len(names))
    fig = Figure(figsize=(4.4 * columns, 3.2 * rows + 0.6), layout="constrained")
    axes = panel_axes(fig, len(names))
    for ax, name in zip(axes, names):
        r = results[name]
        saved = read_report(r["margin_dir"])
        known = saved.predicted is not None and saved.targets is not None
        wrong = saved.predicted != saved.targets if known else None
        title = describe_run(r["net"], r["dataset"], r["transform"])
        title += f", L2 PGD eps {r['pgd_eps']:g}" if r["robust"] else ""
        title += f" ({r['panel_note']})" if r.get("panel_note") else ""
        plot_margins(saved.margins, saved.converged, title=title, ax=ax, misclassified=wrong, legend=False)
        ax.title.set_fontsize(9)
    shared_legend(fig, axes)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    return len(fig.axes)


def page_name(dataset: str) -> str:
    return "RESULTS.md" if dataset == "mnist" else f"RESULTS-{dataset}.md"


def write_outputs(summary: dict, args: argparse.Namespace) -> None:
    """summary.json, the figure and the page under --out; with --docs also under docs/."""
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(args.out / "summary.json")
    targets = [args.out] + ([REPO / "docs"] if args.docs else [])
    for folder in targets:
        figure(summary["results"], folder / summary["figure"])
        name = page_name(args.dataset) if folder != args.out else f"RESULTS-{args.dataset}.md"
        page = folder / name
        kept = keep_beyond_the_paper(page.read_text() if page.is_file() else "")
        page.write_text(render(summary) + kept)
        print(f"results page: {page}")


BEYOND_THE_PAPER = "## Beyond the paper"


def keep_beyond_the_paper(text: str) -> str:
    """The page's "Beyond the paper" section (written by scripts/analyses_mnist.py), to keep it."""
    start = text.find(BEYOND_THE_PAPER)
    return "\n" + text[start:] if start >= 0 else ""


# ---- command line --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    default_data = REPO.parent / "shared" / "data" if IN_CLONE else Path("data")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--dataset", choices=tuple(LABELS), required=True, help="the experiment set")
    a("--data-dir", type=Path, default=default_data, help=f"dataset root (default {default_data})")
    a("--download", action="store_true", help="download MNIST / CIFAR-10 into --data-dir if missing")
    a("--out", type=Path, help="where everything goes (default outputs/reproduce_<dataset>)")
    a("--only", nargs="+", metavar="EXPERIMENT",
      help="run only these experiments (config names; variants: mnist_flipped_robust_lenet_dykstra)")  # fmt: skip
    a("--checkpoint", action="append", default=[], metavar="EXPERIMENT=PATH",
      help="measure this checkpoint instead of training the experiment (repeatable)")  # fmt: skip
    a("--epochs", type=int, help="training epochs per model (default: MNIST 10, otherwise the configs' 30; "
      "each epoch prints a line: loss, accuracy, seconds)")  # fmt: skip
    a("--train-args", default="", help='more train.py flags, e.g. --train-args="--trainer.max_steps 5"')
    a("--margin-args", default="", help='more evaluate_margin.py flags, e.g. --margin-args="--max-iter 50"')
    a("--num-samples", type=int, default=DEFAULT_NUM_SAMPLES,
      help=f"test samples for the margins (default {DEFAULT_NUM_SAMPLES})")  # fmt: skip
    a("--robust-samples", type=int, help="test samples attacked for PGD accuracy (default: MNIST 1000, else 0: none)")
    a("--seed", type=int, default=0, help="seed of training and of the sample draw (default 0)")
    a("--quick", action="store_true", help=QUICK_HELP)
    a("--docs", action="store_true", help="also write the page and figure into docs/")
    a("--emit", choices=("sbatch", "torchrun"), help="write one cluster job per experiment instead of running")
    a("--gpus", type=int, default=1, help="GPUs per job with --emit (default 1; >1: DDP, batch size per GPU)")
    a("--time", default="2-00:00:00", help="SLURM time limit per job with --emit sbatch")
    a("--collect", action="store_true", help="only write the page from the result folders under --out")
    a("--render-only", action="store_true", help="only rewrite the page from <out>/summary.json")
    a("--in-process", action="store_true", help="run training and measurement in this process (tests, debugging)")
    return p


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[Experiment]]:
    parser = build_parser()
    args = parser.parse_args(argv)
    epochs, robust = DEFAULTS[args.dataset]
    args.epochs = args.epochs if args.epochs is not None else epochs
    args.robust_samples = args.robust_samples if args.robust_samples is not None else robust
    if args.quick:
        args.epochs, args.num_samples = 1, QUICK_SAMPLES
        args.robust_samples = min(args.robust_samples, QUICK_PGD_SAMPLES)
    args.out = (args.out or Path("outputs") / f"reproduce_{args.dataset}").resolve()
    args.data_dir = args.data_dir.resolve()
    known = {e.name: e for e in experiments(args.dataset)}
    args.given = {}
    for item in args.checkpoint:
        name, sep, path = item.partition("=")
        if not sep or name not in known:
            parser.error(f"--checkpoint {item}: use EXPERIMENT=PATH with EXPERIMENT one of {', '.join(known)}")
        args.given[name] = Path(path).expanduser().resolve()
    unknown = sorted(set(args.only or []) - set(known))
    if unknown:
        parser.error(f"--only {' '.join(unknown)}: not an experiment of {args.dataset}; choose from {', '.join(known)}")
    return args, [e for e in known.values() if not args.only or e.name in args.only]


def main(argv: list[str] | None = None) -> dict:
    """Run (or emit, or collect) the experiment set; returns the summary (empty after --emit)."""
    args, chosen = parse(argv)
    if args.render_only:
        summary = json.loads((args.out / "summary.json").read_text())
        if "per_net_claims" not in summary:
            raise SystemExit(f"error: {args.out / 'summary.json'} was written by an earlier version; rerun the command")
        write_outputs(summary, args)
        return summary
    if args.emit:
        emit(chosen, args)
        return {}
    start = time.perf_counter()
    if args.collect:
        results = {e.name: r for e in chosen if (r := collect(e, args)) is not None}
    else:
        try:
            with interruptible():
                results = {e.name: run_experiment(e, args, start) for e in chosen}
        except Interrupted as stop:
            command = f"{PROGRAM} {shlex.join(sys.argv[1:] if argv is None else argv)}"
            print(f"stopped by {stop}: finished trainings and last.ckpt of the current one are kept under {args.out}; "
                  f"resume with: {command}", file=sys.stderr, flush=True)  # fmt: skip
            raise SystemExit(128 + stop.signum) from None
    if not results:
        raise SystemExit(f"error: no finished experiment under {args.out}; run the jobs first")
    summary = make_summary(results, args, time.perf_counter() - start, argv)
    write_outputs(summary, args)
    print(f"done in {summary['seconds']:.0f} s: {args.out / 'summary.json'}")
    return summary


def make_summary(results: dict, args: argparse.Namespace, seconds: float, argv: list[str] | None) -> dict:
    per_net = args.dataset == "cifar10"
    devices = sorted({r["device"] for r in results.values()})
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "given"}
    settings["given"] = {k: str(v) for k, v in args.given.items()}
    return {
        "settings": settings,
        "label": LABELS[args.dataset],
        "command": f"{PROGRAM} {shlex.join(sys.argv[1:] if argv is None else argv)}",
        "seconds": seconds,
        "torch": torch.__version__,
        "device": "margins on " + ", ".join(d.upper() if d == "cpu" else d for d in devices),
        "figure": f"{args.dataset}_margins.png",
        "summary_file": shown(args.out / "summary.json"),
        "per_net_claims": per_net,
        "results": results,
        "claims": claim_values(results, args.dataset, per_net),
    }


def shown(path: Path) -> str:
    """`path` relative to the clone when inside it (how the pages name a file), else absolute."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def cli() -> int:
    """Console script `hmt-reproduce`."""
    main()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
