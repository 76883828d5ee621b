"""Scaling figures of the margin evaluation (docs/SCALING.md).

1. Throughput of the engine on ResNet-50 at 3x224x224 (random weights), ImageNet subspaces (16x16 blocks, step 16):
   (sample, subspace) row-iterations per second and model passes per second (one DeepFool iteration of a row = one
   forward with graph + 9 input-gradient backward passes + one forward for the stop test). On CUDA when available.
2. Peak RSS of `evaluate_margins` (one process, a subprocess each) on a generated 3x224x224 dataset with a tiny
   model: per chunk size, and 200 vs 2,000 samples at the same chunk size (streaming: should not grow with N).

    python benchmarks/bench_scaling.py [--rows 4] [--iters 2] [--skip-resnet] [--skip-rss]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attacks.deepfool import SubspaceDeepFool  # noqa: E402
from frequency import DCTBlockSubspaces  # noqa: E402
from models import build_model  # noqa: E402

SHAPE = (3, 224, 224)
PASSES_PER_ITERATION = 11  # forward with graph + 9 candidate gradients + stop-test forward


class GeneratedImages(Dataset):
    """`size` images [3, 224, 224] in [0, 1] made on the fly from their index (nothing held in memory)."""

    def __init__(self, size: int, num_classes: int = 10):
        self.size, self.num_classes = size, num_classes

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(i)
        return torch.rand(SHAPE, generator=g), i % self.num_classes


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 16, stride=16), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 10)).eval()


def resnet_throughput(rows: int, iters: int, device: torch.device) -> dict[str, float]:
    """Row-iterations/s of ResNet-50 (random weights); rows spread over the 14 ImageNet subspaces."""
    torch.manual_seed(0)
    model = build_model("resnet50", num_classes=1000).to(device).eval()
    family = DCTBlockSubspaces(SHAPE, 16, 16)
    x = torch.rand(1, *SHAPE, device=device)
    attack = SubspaceDeepFool(max_iter=iters, batch_size=rows, min_step=1e-12, overshoot=0.0)
    sub = torch.arange(rows) % len(family)
    attack.attack_rows(model, x, family, torch.zeros(1, dtype=torch.long), sub[:1])  # warm-up
    start = time.perf_counter()
    result = attack.attack_rows(model, x, family, torch.zeros(rows, dtype=torch.long), sub)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    row_iters = int(result.iterations.sum())
    return {
        "device": str(device),
        "rows": rows,
        "row_iterations": row_iters,
        "seconds": seconds,
        "row_iterations_per_s": row_iters / seconds,
        "model_passes_per_s": PASSES_PER_ITERATION * row_iters / seconds,
    }


def rss_child(num_samples: int, chunk_rows: int, out: str) -> None:
    """Run one evaluation and print its peak RSS (MiB) as JSON."""
    from margins.run.evaluate import AttackSettings, RunSettings, evaluate_margins

    torch.set_num_threads(1)
    start = time.perf_counter()
    evaluate_margins(
        model=tiny_model(),
        dataset=GeneratedImages(num_samples),
        subspaces=DCTBlockSubspaces(SHAPE, 112, 112),
        indices=torch.arange(num_samples).numpy(),
        output_dir=out,
        attack=AttackSettings(max_iter=1, chunk_rows=chunk_rows),
        run=RunSettings(accelerator="cpu", devices=1, progress=False),
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"samples": num_samples, "chunk_rows": chunk_rows, "peak_rss_mib": peak,
                      "seconds": time.perf_counter() - start}))  # fmt: skip


def measure_rss(num_samples: int, chunk_rows: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, __file__, "--rss-child", str(num_samples), str(chunk_rows), str(Path(tmp) / "out")]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4, help="rows attacked together in the ResNet-50 timing")
    parser.add_argument("--iters", type=int, default=2, help="DeepFool iterations in the ResNet-50 timing")
    parser.add_argument("--skip-resnet", action="store_true")
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--rss-child", nargs=3, metavar=("N", "CHUNK", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(int(args.rss_child[0]), int(args.rss_child[1]), args.rss_child[2])
        return
    if not args.skip_resnet:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        print("resnet50", json.dumps(resnet_throughput(args.rows, args.iters, device)))
    if not args.skip_rss:
        for chunk in (16, 64, 256):
            print("rss per chunk size", json.dumps(measure_rss(200, chunk)))
        small, large = measure_rss(200, 64), measure_rss(2000, 64)
        ratio = large["peak_rss_mib"] / small["peak_rss_mib"]
        print(f"peak RSS 200 samples: {small['peak_rss_mib']:.0f} MiB, 2000 samples: {large['peak_rss_mib']:.0f} MiB, "
              f"ratio {ratio:.3f} (within 20%: {abs(ratio - 1) <= 0.2})")  # fmt: skip


if __name__ == "__main__":
    main()
