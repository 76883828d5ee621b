"""Whole-process cost of `evaluate_margin.py` against a release-form process, LeNet on real MNIST (issue 11).

(a) `python evaluate_margin.py --checkpoint CKPT --num-samples N --threads T` as a subprocess, `--repeats` times:
    wall and CPU seconds (the child's rusage), the engine's seconds (`extra.engine_seconds` of the result's
    summary.json: time inside `SubspaceDeepFool.attack_rows`, summed over the chunks) and everything outside the
    engine (wall - engine). One more run of the same command with timestamps (the script's `main` called from a
    small wrapper that times its steps) splits the outside: interpreter start-up and exit, `import torch`, the
    script's other imports, checkpoint + data + samples, matplotlib import, plot and result files, the rest; and
    lists which of lightning, torchmetrics, torchvision, matplotlib the process imported. `python -c "import torch"`
    and `python -c pass` are timed alone next to it.
(b) a release-form process: imports torch and torchvision (as the release does), loads the same checkpoint's model
    and the same N test samples (torchvision's MNIST, `margins.select_indices` with seed 0), builds the dense DCT
    bases (`tests/deepfool_reference.dct_block_basis`) and runs `benchmarks/release_form.release_form_margins` on
    `--threads` T threads (default 1; the release itself runs with torch's default, every core).
    `--release-samples M` runs it on the first M samples and scales its loop time by N/M (printed as scaled).

Prints the figures and the ratio (b)/(a) of whole-process wall times. Nothing is asserted.

    python benchmarks/bench_process.py --checkpoint logs/mnist_lenet/version_0/checkpoints/last.ckpt \\
        [--data-dir ../shared/data] [--num-samples 100] [--release-samples 20] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("lightning", "torchmetrics", "torchvision", "matplotlib")

# (a) with timestamps: evaluate_margin.py's __main__ block, its steps timed by wrapping the functions main calls
INSTRUMENTED = r"""
import gc, json, sys, time
gc.disable()  # as evaluate_margin.py does when run as a command
t0 = time.perf_counter()
import torch
t_torch = time.perf_counter()
import evaluate_margin
import margins.evaluate as E
t_imports = time.perf_counter()
phases = {}

def timed(owner, name, key):
    inner = getattr(owner, name)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            phases[key] = phases.get(key, 0.0) + time.perf_counter() - start
    setattr(owner, name, wrapper)

def write_report(*args, **kwargs):
    start = time.perf_counter()
    import margins.plot  # matplotlib
    phases["matplotlib import"] = time.perf_counter() - start
    return inner_write(*args, **kwargs)

inner_write = E.write_report
timed(E, "job_from_checkpoint", "checkpoint, data and samples")
timed(E.ChunkWork, "attack", "engine")
E.write_report = write_report
timed(E, "write_report", "matplotlib import + plot + result files")
gc.freeze()  # as evaluate_margin.py's __main__ block does, around main
gc.enable()
code = evaluate_margin.main(json.loads(sys.argv[1]))
gc.freeze()
t_end = time.perf_counter()
phases["plot + result files"] = phases.pop("matplotlib import + plot + result files") - phases["matplotlib import"]
print(json.dumps({"code": code, "import torch": t_torch - t0, "other imports": t_imports - t_torch,
                  "main": t_end - t_imports, "inside": t_end - t0, "phases": phases,
                  "heavy": [m for m in json.loads(sys.argv[2]) if m in sys.modules]}))
"""

# (b) the release's form: torch + torchvision, dense bases, per-sample loop with parameter gradients
RELEASE = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import torch
import torchvision
from torchvision.datasets import MNIST
from benchmarks.release_form import release_form_margins
from margins.measure import select_indices
from models import Normalize, NormalizedModel, build_model, load_weights
from tests.deepfool_reference import dct_block_basis
t_imports = time.perf_counter()
checkpoint, data_dir, num_samples, run_samples = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(int(sys.argv[5]))
model = NormalizedModel(Normalize.identity((1, 28, 28)), build_model("lenet"))
load_weights(model, checkpoint)
test = MNIST(data_dir, train=False, download=False)
indices = select_indices(len(test), num_samples, 0)[:run_samples]
x = test.data[torch.as_tensor(indices)].unsqueeze(1).float() / 255.0
bases = [dct_block_basis((1, 28, 28), s, 8).float() for s in range(21)]
t_setup = time.perf_counter()
margins = release_form_margins(model, x, bases)
t_loop = time.perf_counter()
print(json.dumps({"imports": t_imports - t0, "setup": t_setup - t_imports, "loop": t_loop - t_setup,
                  "inside": t_loop - t0, "median_margin_s0": float(margins[0].median())}))
"""


def run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float, float]:
    """The completed process, its wall seconds and its CPU seconds (user + system, from the children's rusage)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return proc, wall, cpu


def env_with_repo() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a LeNet/MNIST checkpoint of this project (required; see below)")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"), help="root holding MNIST/raw")
    p.add_argument("--num-samples", type=int, default=100, help="test samples (default 100)")
    p.add_argument("--release-samples", type=int, help="run the release form on this many samples and scale")
    p.add_argument("--repeats", type=int, default=3, help="plain runs of evaluate_margin.py (default 3)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of both processes (default 1)")
    args = p.parse_args()
    if not args.checkpoint:
        sys.exit(
            "error: --checkpoint is required (this benchmark trains nothing). Make one with\n"
            "    python train.py fit --config configs/mnist_lenet.yaml --data.data_dir ../shared/data "
            "--trainer.max_epochs 3\n"
            "and pass logs/mnist_lenet/version_N/checkpoints/last.ckpt (or run scripts/reproduce_mnist.py --only "
            "mnist_lenet --epochs 3 --out outputs/quickstart, see README)."
        )
    n = args.num_samples
    m = min(args.release_samples or n, n)
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "margins"
        argv = [
            "--checkpoint", args.checkpoint, "--data-dir", args.data_dir, "--num-samples", str(n),
            "--threads", str(args.threads), "--output-dir", str(out), "--overwrite", "--no-progress",
        ]  # fmt: skip

        # (a) the whole process, plain
        walls, cpus, engines = [], [], []
        for _ in range(args.repeats):
            _, wall, cpu = run([py, "evaluate_margin.py", *argv])
            extra = json.loads((out / "summary.json").read_text())["extra"]
            walls.append(wall)
            cpus.append(cpu)
            engines.append(extra["engine_seconds"])
        _, torch_wall, torch_cpu = run([py, "-c", "import torch"])
        _, bare_wall, _ = run([py, "-c", "pass"])
        proc, inst_wall, _ = run([py, "-c", INSTRUMENTED, json.dumps(argv), json.dumps(HEAVY)], env_with_repo())
        steps = json.loads(proc.stdout.strip().splitlines()[-1])

        # (b) the release-form process
        proc, rel_wall, rel_cpu = run(
            [py, "-c", RELEASE, args.checkpoint, args.data_dir, str(n), str(m), str(args.threads)], env_with_repo()
        )
        rel = json.loads(proc.stdout.strip().splitlines()[-1])

    best = min(range(len(walls)), key=walls.__getitem__)
    wall, engine = walls[best], engines[best]
    print(f"LeNet / MNIST, {n} samples x 21 DCT subspaces, {args.threads} thread(s); checkpoint {args.checkpoint}")
    print(f"\n(a) evaluate_margin.py, whole process ({args.repeats} runs; fastest shown, median in brackets)")
    median = statistics.median
    print(f"  wall {wall:6.2f} s [{median(walls):.2f}]   CPU {cpus[best]:6.2f} s [{median(cpus):.2f}]")
    print(f"  engine (summary.json extra.engine_seconds) {engine:6.2f} s [{median(engines):.2f}]")
    outside = [w - e for w, e in zip(walls, engines)]
    print(f"  outside the engine {wall - engine:6.2f} s [{median(outside):.2f}]")
    print(f"  alone: python -c 'import torch' {torch_wall:.2f} s wall ({torch_cpu:.2f} s CPU)")
    print(f"         python -c pass {bare_wall:.2f} s wall")
    print(f"  one run with timestamps: wall {inst_wall:.2f} s, heavy modules imported: {steps['heavy'] or 'none'}")
    rows = [
        ("interpreter start-up and exit", inst_wall - steps["inside"]),
        ("import torch", steps["import torch"]),
        ("the script's other imports", steps["other imports"]),
        *(
            (name, steps["phases"].get(name, 0.0))
            for name in (
                "checkpoint, data and samples",
                "engine",
                "matplotlib import",
                "plot + result files",
            )
        ),  # fmt: skip
        ("the rest (folder checks, chunk files, merge, summary)", steps["main"] - sum(steps["phases"].values())),
    ]
    for name, seconds in rows:
        print(f"    {name:55s} {seconds:6.2f} s")
    print(f"    {'outside the engine':55s} {inst_wall - steps['phases'].get('engine', 0.0):6.2f} s")

    scale = n / m
    rel_whole = rel_wall - rel["loop"] + rel["loop"] * scale
    scaled = f" (loop measured on {m} samples, scaled x{scale:.2f})" if m < n else ""
    print(f"\n(b) release-form process{scaled}")
    print(
        f"  wall {rel_whole:6.2f} s{' (scaled)' if m < n else ''}; measured {rel_wall:.2f} s wall, {rel_cpu:.2f} s CPU"
    )
    print(f"    imports (torch, torchvision, ...) {rel['imports']:6.2f} s")
    print(f"    model + data + dense bases        {rel['setup']:6.2f} s")
    print(f"    per-sample loop {rel['loop'] * scale:8.2f} s{' (scaled)' if m < n else ''}")
    print(f"\nratio (b)/(a), whole-process wall: {rel_whole / wall:.1f}x")


if __name__ == "__main__":
    main()
