"""Subspace FMN in the full space against foolbox 3.3.4's minimum-norm attacks, on one LeNet and one set of samples.

LeNet after 300 SGD steps on real MNIST (the recipe of benchmarks/bench_deepfool.py: seed 0, batch 128, lr 0.05,
momentum 0.9; an untrained LeNet on random images when MNIST is absent), the first `--samples` test images,
float32. Every attack is untargeted against the clean predicted label (foolbox: `Misclassification` of those
labels) with no pixel box (foolbox: bounds (-1e6, 1e6), which never bind), and all run on the same images:

- ours: `SubspaceFMN` along `FullSpace`;
- foolbox `L2FMNAttack` as shipped, with our step count. Its L2 `project` (3.3.4 and later) scales the
  perturbation by `min(1, norms / norms)` = 1, so its iterates never return into the norm budget and it keeps
  the first adversarial point of an annealed normalised-gradient ascent;
- the same with `project` as the paper defines it (`x0 + d min(1, eps / ||d||)`, d = x - x0): FMN proper;
- foolbox `L2DeepFoolAttack` (10 candidates, overshoot 0.02, 50 steps, logit differences) and this project's
  DeepFool engine (`SubspaceDeepFool()` defaults), for context.

Medians are over the samples where that attack changed the label; ratios are per sample, over samples where
both did. Times: CPU seconds of this process (`time.process_time`; wall seconds on CUDA) and wall seconds.
Benchmarks print figures and assert nothing. foolbox is optional (`pip install foolbox==3.3.4`).

    python benchmarks/bench_fmn.py [--samples 1000] [--steps 200] [--train-steps 300] [--threads 1]
        [--data-dir ../shared/data] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_deepfool import mnist_model, timed  # noqa: E402  (the same LeNet recipe and timer)

from attacks.deepfool import SubspaceDeepFool  # noqa: E402
from attacks.fmn import SubspaceFMN  # noqa: E402

UNBOUNDED = (-1e6, 1e6)


def foolbox_attacks(steps: int) -> dict[str, object] | None:
    """foolbox's L2 FMN as shipped, with the paper's L2 projection, and L2 DeepFool; None when not installed."""
    try:
        import eagerpy as ep
        import foolbox as fb
        from foolbox.devutils import atleast_kd, flatten
    except ImportError:
        return None

    class PaperL2FMN(fb.attacks.L2FMNAttack):
        """`L2FMNAttack` whose projection onto the eps-ball is the paper's: `x0 + d min(1, eps / ||d||)`."""

        def project(self, x, x0, epsilon):
            norms = ep.maximum(flatten(x - x0).norms.l2(axis=-1), 1e-12)
            return x0 + (x - x0) * atleast_kd(ep.minimum(1, epsilon / norms), x.ndim)

    print(f"foolbox {fb.__version__}")
    return {
        "foolbox L2FMNAttack (as shipped)": fb.attacks.L2FMNAttack(steps=steps),
        "foolbox L2FMNAttack, paper's projection": PaperL2FMN(steps=steps),
        "foolbox L2DeepFoolAttack": fb.attacks.L2DeepFoolAttack(steps=50, candidates=10, overshoot=0.02),
    }


def run_foolbox(attack, model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Margins [N] and success flags [N] of a foolbox minimisation attack, with bounds that never bind."""
    import foolbox as fb

    fmodel = fb.PyTorchModel(model, bounds=UNBOUNDED, device=x.device)
    raw, _, success = attack(fmodel, x, fb.criteria.Misclassification(labels), epsilons=None)
    return (raw - x).flatten(1).norm(dim=1), success


def report(name: str, margins: torch.Tensor, ok: torch.Tensor, seconds: float, wall: float) -> None:
    median = margins[ok].median().item() if ok.any() else float("nan")
    print(f"{name:<42} {median:>9.4f} {ok.float().mean().item():>8.3f} {seconds:>9.2f} {wall:>9.2f}")


def compare(name: str, ours: torch.Tensor, ours_ok: torch.Tensor, other: torch.Tensor, other_ok: torch.Tensor) -> None:
    both = ours_ok & other_ok
    ratio = ours[both] / other[both]
    medians = ours[ours_ok].median().item() / other[other_ok].median().item()
    low, high = torch.quantile(ratio.double(), torch.tensor([0.1, 0.9], dtype=torch.float64)).tolist()
    print(
        f"ours / {name}: ratio of medians {medians:.4f}; per sample: median {ratio.median().item():.4f} "
        f"(10%-90%: {low:.3f}-{high:.3f}), ours smaller on {(ratio < 1).float().mean().item():.3f}, within 2% on "
        f"{((ratio - 1).abs() <= 0.02).float().mean().item():.3f} of {int(both.sum())} samples"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=SubspaceFMN().steps, help="FMN steps, ours and foolbox's")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, x = mnist_model("lenet", args.data_dir, args.train_steps, device, num_test=args.samples)
    print(f"{args.samples} samples, full space, float32, {args.threads} thread(s), {device}, FMN steps {args.steps}")
    print(f"{'attack':<42} {'median':>9} {'success':>8} {'seconds':>9} {'wall s':>9}")
    ours, seconds, wall = timed(lambda: SubspaceFMN(steps=args.steps)(model, x), device)
    margins, ok = ours.margins[0], ours.converged[0]
    report("ours: SubspaceFMN, FullSpace", margins, ok, seconds, wall)
    deepfool, seconds, wall = timed(lambda: SubspaceDeepFool()(model, x), device)
    report("DeepFool engine (SubspaceDeepFool defaults)", deepfool.margins[0], deepfool.converged[0], seconds, wall)
    attacks = foolbox_attacks(args.steps)
    if attacks is None:
        print("foolbox not installed (pip install foolbox==3.3.4): foolbox anchors skipped")
    results = {}
    for name, attack in (attacks or {}).items():
        (other, other_ok), seconds, wall = timed(lambda a=attack: run_foolbox(a, model, x, ours.labels), device)
        report(name, other, other_ok, seconds, wall)
        results[name] = other, other_ok
    compare("DeepFool engine", margins, ok, deepfool.margins[0], deepfool.converged[0])
    for name, (other, other_ok) in results.items():
        compare(name, margins, ok, other, other_ok)


if __name__ == "__main__":
    main()
