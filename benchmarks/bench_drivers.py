"""Every margin command through the one driver: `frequency_analysis.py map2d` and `random` against `evaluate_margin.py`
for the same number of (subspace, sample) rows, each a whole process, on one checkpoint.

Rows: `evaluate_margin.py` N x 21 DCT subspaces (MNIST 8x8, step 1); `map2d` N' x 36 blocks (8x8, stride 4);
`random` N'' x 2 families x 21 subspaces, with N, N', N'' chosen so all three measure the same number of rows (the
least common multiple of 21, 36 and 42 times --scale). Each command runs --repeats times in a fresh output folder,
round robin; the fastest wall time is shown, with the engine time the command itself reports. The ratio column
divides a command's time by evaluate_margin.py's.

    python benchmarks/bench_drivers.py --checkpoint CKPT [--data-dir ../shared/data] [--scale 2] [--repeats 3]
        [--threads 1]   # CKPT e.g. outputs/reproduce_mnist/logs/mnist_lenet/reproduce/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROWS_PER_SAMPLE = {"evaluate_margin.py": 21, "map2d": 36, "random": 42}


def command(name: str, samples: int, args: argparse.Namespace, out: Path) -> list[str]:
    common = ["--checkpoint", args.checkpoint, "--data-dir", args.data_dir, "--num-samples", str(samples)]
    common += ["--threads", str(args.threads), "--output-dir", str(out), "--no-progress"]
    if name == "evaluate_margin.py":
        return [sys.executable, str(REPO / "evaluate_margin.py"), *common]
    extra = ["--count", "21"] if name == "random" else []
    return [sys.executable, str(REPO / "frequency_analysis.py"), name, *common, *extra]


def run_once(cmd: list[str]) -> tuple[float, str]:
    """Wall seconds of the whole process and the time line it printed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    time_line = next((line for line in done.stdout.splitlines() if line.startswith("time:")), "")
    return seconds, time_line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--scale", type=int, default=2, help="rows = scale x lcm(21, 36, 42) = scale x 252")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    rows = args.scale * math.lcm(*ROWS_PER_SAMPLE.values())
    samples = {name: rows // per for name, per in ROWS_PER_SAMPLE.items()}
    best: dict[str, tuple[float, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for name in ROWS_PER_SAMPLE:
                out = Path(tmp) / f"{name}-{repeat}"
                seconds, line = run_once(command(name, samples[name], args, out))
                if name not in best or seconds < best[name][0]:
                    best[name] = (seconds, line)
    print(f"{rows} rows per command, {args.threads} thread(s), fastest of {args.repeats} (wall seconds, whole process)")
    reference = best["evaluate_margin.py"][0]
    for name, per in ROWS_PER_SAMPLE.items():
        seconds, line = best[name]
        engine = re.search(r"time: ([0-9.]+) s", line)
        engine_text = f"({engine.group(1)} s in the engine)" if engine else ""
        print(
            f"{name:>20}: {samples[name]:4d} samples x {per} rows = {rows}  {seconds:7.2f} s  "
            f"{seconds / reference:5.2f}x evaluate_margin.py  {engine_text}"
        )


if __name__ == "__main__":
    main()
