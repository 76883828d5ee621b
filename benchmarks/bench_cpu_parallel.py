"""Threads or processes on CPU: whole `evaluate_margin.py` runs of one checkpoint with `--threads 1`, `--threads N`
and `--devices N --threads 1` (N: the cores this process may use), interleaved: every round runs each variant once,
in a new shuffled order. Prints per run the wall seconds of the whole command and the run's own seconds from its
summary.json (`extra.seconds`: from the job's start, imports and process start-up excluded), then per variant the
best and the median.

    python benchmarks/bench_cpu_parallel.py --checkpoint logs/mnist_lenet/version_0/checkpoints/last.ckpt \\
        [--rounds 6] [--cores 2] [--data-dir ../shared/data] [-- more evaluate_margin.py flags]

The figures of docs/ENGINE.md ("Threads and processes on CPU") come from it on a LeNet, 100 samples x 21 subspaces.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def variants(cores: int) -> dict[str, list[str]]:
    return {
        "threads 1": ["--threads", "1"],
        f"threads {cores}": ["--threads", str(cores)],
        f"devices {cores} x threads 1": ["--accelerator", "cpu", "--devices", str(cores), "--threads", "1"],
    }


def one_run(flags: list[str], folder: Path) -> tuple[float, float]:
    """(wall seconds of the command, the run's own seconds from its summary.json)."""
    start = time.perf_counter()
    cmd = [sys.executable, "evaluate_margin.py", *flags, "--output-dir", str(folder), "--no-progress", "--overwrite"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"evaluate_margin.py failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return wall, json.loads((folder / "summary.json").read_text())["extra"]["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)), help="N (default: usable cores)")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    args, more = parser.parse_known_args()
    common = ["--checkpoint", args.checkpoint, "--data-dir", args.data_dir, *[m for m in more if m != "--"]]
    chosen = variants(args.cores)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in chosen}
    order, shuffle = list(chosen), random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            shuffle.shuffle(order)
            for name in order:
                wall, seconds = one_run(common + chosen[name], Path(tmp) / name.replace(" ", "_"))
                runs[name].append((wall, seconds))
                load = os.getloadavg()[0]
                print(
                    f"round {round_}, load {load:.1f}: {name:24s} wall {wall:7.1f} s, run {seconds:7.1f} s", flush=True
                )
    print(f"\n{'variant':24s} {'wall best':>9s} {'median':>7s} {'run best':>9s} {'median':>7s}")
    for name, timings in runs.items():
        walls, seconds = [t[0] for t in timings], [t[1] for t in timings]
        print(f"{name:24s} {min(walls):9.1f} {statistics.median(walls):7.1f} {min(seconds):9.1f} "
              f"{statistics.median(seconds):7.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
