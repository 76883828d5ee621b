"""Batched subspace DeepFool vs the straightforward per-sample, per-subspace loop (the release's form).

MNIST settings of REFERENCE §3 (21 subspaces, block 8, step 1) on a LeNet, CPU, float32. Prints both
times, the speed-up, the largest relative margin difference, and the memory of the ImageNet family.

    python benchmarks/bench_deepfool.py [--num-samples 100] [--train-steps 300] [--data-dir ../shared/data]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attacks.deepfool import SubspaceDeepFool  # noqa: E402
from frequency import DCTBlockSubspaces  # noqa: E402
from models import Normalize, NormalizedModel, build_model  # noqa: E402
from tests.deepfool_reference import dct_block_basis, reference_deepfool  # noqa: E402


def mnist_tensors(data_dir: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    from torchvision.datasets import MNIST

    try:
        ds = MNIST(root=str(data_dir), train=train, download=False)
    except RuntimeError:
        return None
    return ds.data.unsqueeze(1).float() / 255.0, ds.targets


def lenet(data_dir: Path, train_steps: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """A LeNet trained for a few SGD steps on real MNIST (random images if MNIST is absent), and test images."""
    torch.manual_seed(0)
    model = NormalizedModel(Normalize(0.1307, 0.3081, (1, 28, 28)), build_model("lenet"))
    train, test = mnist_tensors(data_dir, True), mnist_tensors(data_dir, False)
    if train is None or test is None:
        print(f"MNIST not found under {data_dir}: random images and an untrained LeNet")
        return model.eval(), torch.rand(1000, 1, 28, 28)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(train_steps):
        idx = torch.randint(0, len(train[0]), (128,))
        loss = torch.nn.functional.cross_entropy(model(train[0][idx]), train[1][idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        acc = (model(test[0][:2000]).argmax(1) == test[1][:2000]).float().mean().item()
    print(f"LeNet after {train_steps} SGD steps: test accuracy {acc:.3f} (first 2000 test images)")
    return model, test[0]


def loop_form(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The release's form: one DeepFool run per (subspace, sample) with a dense basis. Returns margins, iterations."""
    shape = tuple(x.shape[1:])
    family = DCTBlockSubspaces(shape, block=8, step=1)
    margins = torch.empty(len(family), len(x), dtype=torch.float64)
    iterations = torch.empty(len(family), len(x), dtype=torch.long)
    for s in range(len(family)):
        basis = dct_block_basis(shape, s, 8).to(dtype)
        for n in range(len(x)):
            pert, iters, _ = reference_deepfool(model, x[n], basis)
            margins[s, n], iterations[s, n] = pert.norm().item(), iters
    return margins, iterations


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() - b.double()).abs() / b.double().clamp_min(1e-12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=100)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument(
        "--no-float64-check",
        dest="float64_check",
        action="store_false",
        help="skip the float64 equality check (which reruns both forms in float64)",
    )
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    args = parser.parse_args()
    torch.manual_seed(0)

    model, images = lenet(args.data_dir, args.train_steps)
    x = images[: args.num_samples]
    family = DCTBlockSubspaces((1, 28, 28), block=8, step=1)
    print(
        f"{args.num_samples} samples x {len(family)} subspaces, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )

    start = time.perf_counter()
    batched = SubspaceDeepFool()(model, x, family)
    batched_seconds = time.perf_counter() - start

    start = time.perf_counter()
    loop_margins, loop_iters = loop_form(model, x, dtype=torch.float32)
    loop_seconds = time.perf_counter() - start

    rel_all = relative_difference(batched.margins, loop_margins)
    print(f"loop (per sample, per subspace): {loop_seconds:8.2f} s")
    print(f"batched engine:                  {batched_seconds:8.2f} s")
    print(f"speed-up:                        {loop_seconds / batched_seconds:8.1f} x")
    print(
        f"float32: largest relative margin difference {rel_all.max():.2e} (median {rel_all.median():.1e}, "
        f"rows above 1e-4: {int((rel_all > 1e-4).sum())} of {rel_all.numel()}); iterations equal: "
        f"{torch.equal(batched.iterations, loop_iters)}"
    )
    print(
        f"non-converged: {int((~batched.converged).sum())}; median margin per subspace: "
        f"{[round(v, 2) for v in batched.margins.median(dim=1).values.tolist()]}"
    )
    if args.float64_check:
        # float32 rounding differs between batched and per-sample arithmetic; where a DeepFool step lands within
        # ~1e-6 of a ReLU / max-pool kink the two can take different sides and drift apart. In float64 both
        # implementations compute the same margins to rounding.
        model64, x64 = copy.deepcopy(model).double(), x.double()
        start = time.perf_counter()
        exact_batched = SubspaceDeepFool()(model64, x64, family).margins
        batched64 = time.perf_counter() - start
        start = time.perf_counter()
        exact_loop, _ = loop_form(model64, x64, dtype=torch.float64)
        loop64 = time.perf_counter() - start
        rel64 = relative_difference(exact_batched, exact_loop)
        print(
            f"float64: loop {loop64:.2f} s, batched {batched64:.2f} s, speed-up {loop64 / batched64:.1f} x; "
            f"largest relative margin difference {rel64.max():.2e}"
        )

    imagenet = DCTBlockSubspaces((3, 224, 224), block=16, step=16)
    dense = sum(imagenet.dims) * 3 * 224 * 224 * 4
    print(
        f"ImageNet family ({len(imagenet)} subspaces of dim {imagenet.dims[0]}): "
        f"{imagenet.memory_bytes() / 2**20:.2f} MiB as masks vs {dense / 2**30:.2f} GiB as dense float32 bases"
    )


if __name__ == "__main__":
    main()
