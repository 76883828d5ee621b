"""Reproduce the paper's MNIST experiments with this project's own commands, and write docs/RESULTS.md.

For each experiment: `train.py fit` with its config (fewer epochs than the release's 30, see --epochs), then
`evaluate_margin.py` on 100 test samples, then clean and PGD accuracy on the test set. Finally a summary
(`<out>/summary.json`), the paper-style figure and, with --docs, `docs/RESULTS.md` and `docs/*.png`.

    python scripts/reproduce_mnist.py --data-dir ../shared/data --out outputs/reproduce_mnist --docs
    python scripts/reproduce_mnist.py --quick --out /tmp/quick      # a few minutes: the slow test's version
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from attacks.pgd import L2PGD  # noqa: E402
from margins import plot_margins, read_report  # noqa: E402
from margins.inputs import load_model_and_data  # noqa: E402


@dataclass
class Experiment:
    name: str  # config name in configs/, unless `config` is given; also the run's folder
    title: str
    robust: bool = False
    flipped: bool = False
    synthetic: bool = False
    overrides: list[str] = field(default_factory=list)
    config: str = ""  # config name when it differs from `name` (a variant of a config, by `overrides`)

    @property
    def config_name(self) -> str:
        return self.config or self.name


EXPERIMENTS = [
    Experiment("mnist_lenet", "MNIST, LeNet"),
    Experiment("mnist_flipped_lenet", "Flipped MNIST, LeNet", flipped=True),
    Experiment("mnist_lowpass_lenet", "Low-pass MNIST (14x14), LeNet"),
    Experiment("mnist_robust_lenet", "MNIST, LeNet, L2 PGD eps=2", robust=True),
    Experiment(
        "mnist_flipped_robust_lenet", "Flipped MNIST, LeNet, L2 PGD eps=2 (exact projection)", robust=True, flipped=True
    ),
    Experiment(
        "mnist_flipped_robust_lenet_dykstra",
        "Flipped MNIST, LeNet, L2 PGD eps=2 (Dykstra, the release's)",
        robust=True,
        flipped=True,
        overrides=["--model.init_args.projection", "dykstra"],
        config="mnist_flipped_robust_lenet",
    ),
    Experiment("synthetic_lenet", "Synthetic (one DCT direction), LeNet", synthetic=True),
]


QUICK_BATCHES, QUICK_ROBUST_BATCHES, QUICK_SYNTHETIC_EPOCHS = 120, 400, 4


def run(cmd: list[str], log: Path) -> float:
    """Run a command with its output in `log`; raises with the log's tail on failure. Returns seconds."""
    start = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        proc = subprocess.run(cmd, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ})
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    return time.perf_counter() - start


def train(exp: Experiment, args: argparse.Namespace) -> tuple[Path, float]:
    """`train.py fit` for one experiment; returns its last checkpoint and the seconds spent."""
    save_dir = args.out / "logs"
    cmd = [
        sys.executable, "train.py", "fit", "--config", f"configs/{exp.config_name}.yaml",
        "--data.data_dir", str(args.data_dir), "--trainer.max_epochs", str(args.epochs),
        "--trainer.logger.init_args.save_dir", str(save_dir), "--trainer.logger.init_args.name", exp.name,
        "--trainer.logger.init_args.version", "reproduce",
        "--trainer.enable_progress_bar", "false", "--seed_everything", str(args.seed),
        "--margin.enabled", "false",
    ]  # fmt: skip
    if args.download:
        cmd += ["--data.download", "true"]
    if args.quick:  # adversarial training needs more steps before its margins exceed a standard model's
        batches = QUICK_ROBUST_BATCHES if exp.robust else QUICK_BATCHES
        cmd += ["--trainer.limit_train_batches", str(batches), "--trainer.limit_val_batches", "5"]
        if exp.synthetic:  # 79 batches an epoch: a few epochs to find the direction
            cmd += ["--trainer.max_epochs", str(QUICK_SYNTHETIC_EPOCHS)]
    seconds = run(cmd + exp.overrides, args.out / "logs" / f"{exp.name}_fit.log")
    return save_dir / exp.name / "reproduce" / "checkpoints" / "last.ckpt", seconds


def measure(exp: Experiment, ckpt: Path, args: argparse.Namespace) -> Path:
    out = args.out / "margins" / exp.name
    cmd = [
        sys.executable, "evaluate_margin.py", "--checkpoint", str(ckpt), "--data-dir", str(args.data_dir),
        "--num-samples", str(args.num_samples), "--seed", str(args.seed), "--output-dir", str(out), "--no-progress",
        "--overwrite",  # the models were just retrained: an earlier measurement in this folder is stale
    ]  # fmt: skip
    run(cmd, args.out / "logs" / f"{exp.name}_margins.log")
    return out


def accuracies(ckpt: Path, args: argparse.Namespace, eps: float) -> dict[str, float]:
    """Clean accuracy on the whole test split; accuracy under L2 PGD (20 steps) on its first `--robust-samples`."""
    model, dm = load_model_and_data(ckpt, str(args.data_dir))
    dataset = dm.test_set
    x_all = torch.stack([dataset[i][0] for i in range(len(dataset))])
    y_all = torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
    with torch.no_grad():
        predicted = torch.cat([model(x_all[i : i + 1000]).argmax(1) for i in range(0, len(x_all), 1000)])
    transform = dm.hparams.transform
    flipped = transform == "flip"
    # valid inputs: images in [0, 1] (after un-flipping for flipped data); filtered or synthetic data has no box
    projection = "exact" if flipped else "ball_box" if transform == "none" and dm.name != "synthetic" else "ball"
    generator = torch.Generator().manual_seed(0)
    attack = L2PGD(eps=eps, steps=20, projection=projection, flipped=flipped, generator=generator)
    n = min(args.robust_samples, len(x_all))
    robust = []
    for i in range(0, n, 250):
        x, y = x_all[i : min(i + 250, n)], y_all[i : min(i + 250, n)]
        with torch.no_grad():
            robust.append(model(attack(model, x, y)).argmax(1) == y)
    return {
        "clean_accuracy": float((predicted == y_all).float().mean()),
        "pgd_eps": eps,
        "pgd_accuracy": float(torch.cat(robust).float().mean()),
        "pgd_samples": n,
        "test_samples": len(x_all),
    }


def band_medians(margins: np.ndarray, width: int = 3) -> tuple[float, float]:
    """Median margin over the `width` lowest and the `width` highest frequency subspaces (all their samples)."""
    return float(np.median(margins[:width])), float(np.median(margins[-width:]))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--download", action="store_true", help="download MNIST into --data-dir if missing")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "reproduce_mnist")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs per model (release: 30)")
    parser.add_argument("--num-samples", type=int, default=100, help="test samples for the margins")
    parser.add_argument("--robust-samples", type=int, default=1000, help="test samples attacked for PGD accuracy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="120 steps per model, 20 margin samples (minutes)")
    parser.add_argument("--only", nargs="*", help="run only these experiments (names in EXPERIMENTS)")
    parser.add_argument("--docs", action="store_true", help="write docs/RESULTS.md and docs/*.png from this run")
    parser.add_argument("--render-only", action="store_true", help="only rewrite the docs from <out>/summary.json")
    args = parser.parse_args(argv)
    args.out, args.data_dir = args.out.resolve(), args.data_dir.resolve()
    if args.render_only:
        summary = json.loads((args.out / "summary.json").read_text())
        summary["claims"] = claims(summary["results"])
        write_docs(summary, args.out)
        return summary
    if args.quick:
        args.epochs, args.num_samples, args.robust_samples = 1, 20, 250
    experiments = [e for e in EXPERIMENTS if not args.only or e.name in args.only]

    results = {}
    start = time.perf_counter()
    for exp in experiments:
        print(f"[{time.perf_counter() - start:7.0f} s] {exp.name}: training", flush=True)
        ckpt, train_seconds = train(exp, args)
        print(f"[{time.perf_counter() - start:7.0f} s] {exp.name}: margins", flush=True)
        margin_dir = measure(exp, ckpt, args)
        saved = read_report(margin_dir)
        eps = 1.0 if exp.synthetic else 2.0
        acc = accuracies(ckpt, args, eps)
        low, high = band_medians(saved.margins)
        results[exp.name] = {
            **asdict(exp),
            "checkpoint": str(ckpt),
            "margin_dir": str(margin_dir),
            "train_seconds": train_seconds,
            "margin_seconds": saved.extra["seconds"],
            **acc,
            "median_margin": saved.stats["median_margin_all"],
            "not_converged": saved.stats["num_not_converged_total"],
            "low_band_median": low,
            "high_band_median": high,
        }
        print(f"[{time.perf_counter() - start:7.0f} s] {exp.name}: clean {acc['clean_accuracy']:.4f}, "
              f"PGD {acc['pgd_accuracy']:.4f}, low/high median margin {low:.2f}/{high:.2f}", flush=True)  # fmt: skip
    summary = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "seconds": time.perf_counter() - start,
        "torch": torch.__version__,
        "results": results,
        "claims": claims(results),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(args.out / "summary.json")
    figure(results, args.out / "mnist_margins.png")
    if args.docs:
        write_docs(summary, args.out)
    print(f"done in {summary['seconds']:.0f} s: {args.out / 'summary.json'}")
    return summary


def claims(results: dict) -> dict:
    """The paper's qualitative claims as ratios of band medians, for whichever experiments ran."""
    r, out = results, {}
    ratio = {  # name: (numerator experiment, band, denominator experiment, band)
        "standard_high_over_low": ("mnist_lenet", "high", "mnist_lenet", "low"),
        "flipped_low_over_high": ("mnist_flipped_lenet", "low", "mnist_flipped_lenet", "high"),
        "lowpass_high_over_low": ("mnist_lowpass_lenet", "high", "mnist_lowpass_lenet", "low"),
        "robust_over_standard_low": ("mnist_robust_lenet", "low", "mnist_lenet", "low"),
        "flipped_robust_over_flipped_high": ("mnist_flipped_robust_lenet", "high", "mnist_flipped_lenet", "high"),
        "robust_high_over_low": ("mnist_robust_lenet", "high", "mnist_robust_lenet", "low"),
        "flipped_robust_low_over_high": ("mnist_flipped_robust_lenet", "low", "mnist_flipped_robust_lenet", "high"),
        "flipped_robust_dykstra_over_flipped_high": (
            "mnist_flipped_robust_lenet_dykstra", "high", "mnist_flipped_lenet", "high"
        ),
        "flipped_robust_dykstra_low_over_high": (
            "mnist_flipped_robust_lenet_dykstra", "low", "mnist_flipped_robust_lenet_dykstra", "high"
        ),
    }  # fmt: skip
    for name, (num, num_band, den, den_band) in ratio.items():
        if num in r and den in r:
            out[name] = r[num][f"{num_band}_band_median"] / r[den][f"{den_band}_band_median"]
    if "synthetic_lenet" in r:
        medians = np.array(r["synthetic_lenet"]["median_margin"])
        out["synthetic_direction_subspace_median"] = float(medians[0])
        out["synthetic_others_min_over_direction"] = float(medians[1:].min() / medians[0])
    return out


def figure(results: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    names = list(results)
    cols = 3
    rows = (len(names) + cols - 1) // cols
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows), layout="constrained")
    for i, name in enumerate(names):
        saved = read_report(results[name]["margin_dir"])
        ax = fig.add_subplot(rows, cols, i + 1)
        plot_margins(saved.margins, saved.converged, title=results[name]["title"], ax=ax)
        ax.title.set_fontsize(9)
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    fig.savefig(path, dpi=80)


def write_docs(summary: dict, out: Path) -> None:
    from scripts.results_doc import render

    docs = REPO / "docs"
    figure(summary["results"], docs / "mnist_margins.png")
    results = docs / "RESULTS.md"
    kept = keep_beyond_the_paper(results.read_text() if results.is_file() else "")
    results.write_text(render(summary) + kept)


BEYOND_THE_PAPER = "## Beyond the paper"


def keep_beyond_the_paper(text: str) -> str:
    """The existing "Beyond the paper" section of RESULTS.md (written by scripts/analyses_mnist.py), to keep it."""
    start = text.find(BEYOND_THE_PAPER)
    return "\n" + text[start:] if start >= 0 else ""


if __name__ == "__main__":
    main()
