"""Certified lower bounds (attacks/certify) on the MNIST networks: cost, how it splits, and tightness against FMN and
DeepFool, per method, in one run.

Cases (the certifier in `--dtype`, float64 by default, the attacks in float64; the 21 DCT 8x8 subspaces of MNIST,
step 1; the first `--samples` test images):
- `lenet`: the LeNet of `--checkpoint` (this project's checkpoint, e.g. the reproduction's
  outputs/reproduce_mnist/logs/mnist_lenet/reproduce/checkpoints/last.ckpt), else LeNet after `--train-steps` SGD
  steps on real MNIST (the recipe of benchmarks/bench_deepfool.py);
- `resnet18`: ResNet-18-MNIST of `--resnet-checkpoint`, else the same recipe, `--resnet-samples` images.
`--subspaces` (e.g. 0,20) keeps those subspaces' rows only. Per case: DeepFool and FMN (their defaults, float64) on
the rows, the references; then each method of `--methods`
(`SubspaceCertifier` with its defaults otherwise; the first, "crown", on every sample, the others on the first
`--tight-samples`; their gain is the median per-row ratio to the first on the same rows): CPU seconds
of this process (`time.process_time`; wall seconds on CUDA) and wall seconds of the certifier's call, the wall
split (upper: its DeepFool run; intermediate: pre-activation bounds; final: the margins' bounds and closed form;
a/bab: slope optimisation or branching), bound evaluations per row, the median over rows of certified / FMN and
certified / DeepFool (rows where that attack changed the label), the gain over crown and the count of certificates
above an attack's margin (a bug if ever > 0). Per subspace (crown and the tightest method): median certified bound, FMN,
DeepFool, and the medians of the row ratios. Benchmarks print figures and assert nothing.

    python benchmarks/bench_certify.py [--checkpoint PATH] [--resnet-checkpoint PATH] [--samples 100]
        [--resnet-samples 20] [--cases lenet,resnet18] [--methods crown,alpha-crown,bab] [--tight-samples N]
        [--subspaces 0,20] [--threads 2] [--dtype float64] [--device cpu]
        [--train-steps 300] [--data-dir ../shared/data]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_deepfool import mnist_model, timed  # noqa: E402  (the same recipe and timer)

from attacks.certify import SubspaceCertifier  # noqa: E402
from attacks.common import precision_record  # noqa: E402
from attacks.deepfool import SubspaceDeepFool  # noqa: E402
from attacks.fmn import SubspaceFMN  # noqa: E402
from frequency import DCTBlockSubspaces  # noqa: E402

F64 = torch.float64


def load_case(name: str, checkpoint: Path | None, args, samples: int) -> tuple[torch.nn.Module, torch.Tensor, str]:
    """The model, the first `samples` test images and a description."""
    if checkpoint is None:
        model, x = mnist_model(name, args.data_dir, args.train_steps, args.device, num_test=samples)
        return model, x, f"{name} after {args.train_steps} SGD steps (bench_deepfool recipe)"
    from margins.inputs import load_model_and_data

    model, datamodule = load_model_and_data(checkpoint, data_dir=str(args.data_dir))
    dataset = datamodule.margin_dataset()
    x = torch.stack([dataset[i][0] for i in range(samples)]).to(args.device)
    return model.to(args.device).eval(), x, f"{name} from {checkpoint}"


def medians(values: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    values = values if mask is None else values[mask]
    return values.median().item() if values.numel() else float("nan")


def measure(estimator, model: torch.nn.Module, x: torch.Tensor, family, chosen: list[int]) -> SimpleNamespace:
    """`estimator`'s results on the rows of the `chosen` subspaces (all samples), as [len(chosen), N] fields."""
    n = x.shape[0]
    samples, subspaces = torch.arange(n).repeat(len(chosen)), torch.tensor(chosen).repeat_interleave(n)
    out = estimator.attack_rows(model, x, family, samples, subspaces)
    shape = (len(chosen), n)
    return SimpleNamespace(margins=out.margins.view(shape), converged=out.converged.view(shape),
                           iterations=out.iterations.view(shape))  # fmt: skip


def run_case(name: str, checkpoint: Path | None, samples: int, args) -> None:
    model, x, description = load_case(name, checkpoint, args, samples)
    family = DCTBlockSubspaces((1, 28, 28), 8, 1)
    chosen = args.subspaces or list(range(len(family)))
    rows = samples * len(chosen)
    print(f"\n== {description}: {samples} samples x {len(chosen)} subspaces = {rows} rows, certifier in {args.dtype}"
          f" (attacks in float64), {args.device}")  # fmt: skip
    deepfool, seconds, wall = timed(lambda: measure(SubspaceDeepFool(dtype=F64), model, x, family, chosen), args.device)
    print(f"DeepFool: {seconds:.1f} s CPU, {wall:.1f} s wall; converged {deepfool.converged.float().mean():.3f}")
    fmn, seconds, wall = timed(lambda: measure(SubspaceFMN(dtype=F64), model, x, family, chosen), args.device)
    print(f"FMN: {seconds:.1f} s CPU, {wall:.1f} s wall; converged {fmn.converged.float().mean():.3f}")
    header = (
        f"{'method':<12} {'CPU s':>8} {'wall s':>8} {'upper':>7} {'interm':>7} {'final':>7} {'a/bab':>7} "
        f"{'evals':>6} {'cert/FMN':>9} {'cert/DF':>8} {'gain':>6} {'above':>6}"
    )
    print(header)
    results: dict[str, SimpleNamespace] = {}
    tight = min(args.tight_samples or samples, samples)
    for number, method in enumerate(args.methods):
        n = samples if number == 0 else tight  # the tighter modes on the first `tight` samples
        certifier = SubspaceCertifier(method=method, dtype=args.dtype)
        result, seconds, wall = timed(lambda c=certifier, n=n: measure(c, model, x[:n], family, chosen), args.device)
        results[method] = result
        split = certifier.last_stats.seconds
        base = results[args.methods[0]].margins[:, :n]
        gain = (result.margins / base.clamp(min=1e-300)).median().item()
        f, d = fmn.margins[:, :n], deepfool.margins[:, :n]
        f_ok, d_ok = fmn.converged[:, :n], deepfool.converged[:, :n]
        above = int(((result.margins > f) & f_ok).sum()) + int(((result.margins > d) & d_ok).sum())
        print(
            f"{method:<12} {seconds:>8.1f} {wall:>8.1f} {split['upper']:>7.1f} {split['intermediate']:>7.1f} "
            f"{split['final']:>7.1f} {split['alpha'] + split['bab']:>7.1f} {result.iterations.float().mean():>6.2f} "
            f"{medians(result.margins / f, f_ok):>9.4f} {medians(result.margins / d, d_ok):>8.4f} {gain:>6.3f} "
            f"{above:>6d}  ({n} samples)"
        )
    per_subspace(args.methods[0], results[args.methods[0]], fmn, deepfool, chosen)
    if len(args.methods) > 1:
        tightest = max(args.methods[1:], key=lambda m: results[m].margins.median().item())
        per_subspace(tightest, results[tightest], fmn, deepfool, chosen)


def per_subspace(method: str, result, fmn, deepfool, chosen: list[int]) -> None:
    print(f"per subspace, {method} ({result.margins.shape[1]} samples): medians of the certified bound, FMN, DeepFool "
          "and of the row ratios")  # fmt: skip
    print(f"{'subspace':>8} {'certified':>10} {'FMN':>8} {'DeepFool':>9} {'cert/FMN':>9} {'cert/DF':>8}")
    n = result.margins.shape[1]
    for s in range(result.margins.shape[0]):
        cert, f, d = result.margins[s], fmn.margins[s, :n], deepfool.margins[s, :n]
        fmn_ok, df_ok = fmn.converged[s, :n], deepfool.converged[s, :n]
        print(
            f"{chosen[s]:>8d} {medians(cert):>10.4f} {medians(f, fmn_ok):>8.3f} {medians(d, df_ok):>9.3f} "
            f"{medians(cert / f, fmn_ok):>9.4f} {medians(cert / d, df_ok):>8.4f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="a LeNet checkpoint of this project")
    parser.add_argument("--resnet-checkpoint", type=Path, default=None, help="a ResNet-18-MNIST checkpoint")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--resnet-samples", type=int, default=20)
    parser.add_argument("--cases", default="lenet,resnet18")
    parser.add_argument("--methods", default="crown,alpha-crown,bab", help="the first on every sample, the baseline")
    parser.add_argument("--tight-samples", type=int, default=None, help="samples for the other methods (all)")
    parser.add_argument("--subspaces", default="", help="comma-separated subspace indices (default: all 21)")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64", help="the certifier's dtype")
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    args.device = torch.device(args.device)
    args.dtype = getattr(torch, args.dtype)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.subspaces = [int(s) for s in args.subspaces.split(",") if s.strip()]
    torch.set_num_threads(args.threads)
    print(f"{args.threads} thread(s); {precision_record(args.device, F64)}")
    cases = [c.strip() for c in args.cases.split(",")]
    if "lenet" in cases:
        run_case("lenet", args.checkpoint, args.samples, args)
    if "resnet18" in cases:
        run_case("resnet18_mnist", args.resnet_checkpoint, args.resnet_samples, args)


if __name__ == "__main__":
    main()
