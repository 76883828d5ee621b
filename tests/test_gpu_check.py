"""benchmarks/gpu_check.py: without CUDA it says so and exits 0; its CPU path runs every step end to end."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the real check")
def test_without_cuda_it_says_so_and_exits_cleanly():
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0 and "no CUDA device" in done.stdout


@pytest.mark.slow
def test_the_cpu_path_runs_every_step():
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--chunk-rows", "8,16"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for step in ("[1]", "[2]", "[3]", "[4]", "[5]", "[6]"):
        assert step in out, f"step {step} missing:\n{out}"
    median = float(re.search(r"\[1\] .* median ([0-9.e+-]+),", out).group(1))
    assert median < 1e-5  # float32 against float64 on the same rows
    assert len(re.findall(r"\[3\] ResNet-50 .* rows per chunk", out)) == 2
    assert re.search(r"\[5\] train\.py fit, 10 steps on cpu: exit 0, .* callback folders \['epoch_000'\]", out)
    assert "[6] evaluate_margin.py --accelerator cpu --devices 1: exit 0" in out
