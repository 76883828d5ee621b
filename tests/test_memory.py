"""`common.memory.keep_freed_memory`: freed large blocks stay in the process (no fresh page faults on reuse)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Allocates and frees a 64 MiB tensor (16384 pages of 4 KiB; torch's CPU allocator is plain malloc, numpy's asks
# for huge pages) again and again; prints whether the settings took effect and the minor page faults of ten rounds.
CHILD = """
import resource, sys
import torch
sys.path.insert(0, {root!r})
from common.memory import keep_freed_memory

applied = keep_freed_memory() if sys.argv[1] == "keep" else None
def rounds(n):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        block = torch.ones(16 << 20)  # float32
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
rounds(10)  # warm-up: the heap grows to its working size
print(applied, rounds(10))
"""


def page_faults(mode: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD.format(root=str(ROOT)), mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings: Linux only")
def test_freed_blocks_are_reused_without_page_faults():
    applied, kept = page_faults("keep")
    if applied != "True":
        pytest.skip("this C library has no working mallopt (not glibc)")
    _, default = page_faults("default")
    pages = (64 << 20) // 4096
    assert default > 5 * pages, f"glibc's default should unmap each freed 64 MiB block ({default} faults)"
    assert kept < pages, f"kept memory should be reused without page faults ({kept} faults in 10 rounds)"
