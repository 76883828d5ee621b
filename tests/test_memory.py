"""`common.memory.KeepFreedMemory`: inside the block freed large blocks stay in the process (no fresh page faults on
reuse); after it, glibc hands them back again (the process's own settings are restored)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.memory import KeepFreedMemory, startup_settings

ROOT = Path(__file__).resolve().parents[1]

# Allocates and frees a 64 MiB tensor (16384 pages of 4 KiB; torch's CPU allocator is plain malloc, numpy's asks
# for huge pages) again and again; prints the minor page faults of ten rounds before, inside, inside a nested block
# and after a `KeepFreedMemory` block, and whether the settings took effect.
CHILD = """
import json, resource, sys
import torch
sys.path.insert(0, {root!r})
from common.memory import KeepFreedMemory

def rounds(n, floats=16 << 20):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        block = torch.ones(floats)  # float32: 64 MiB by default
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

rounds(10)  # warm-up
out = {{"before": rounds(10)}}
with KeepFreedMemory() as kept:
    rounds(10)  # the heap grows to its working size
    out["kept"], out["inside"] = kept, rounds(10)
    with KeepFreedMemory() as nested:
        pass
    out["nested"], out["after_nested"] = nested, rounds(10)
with KeepFreedMemory(enabled=False) as disabled:
    out["disabled"] = disabled
# after: a block larger than all the heap kept (its free chunks may stay in malloc's bins, reused by blocks that
# fit, as glibc does whatever the settings) is mapped and unmapped again, as before the block
out["after"] = rounds(5, 64 << 20)  # 256 MiB
print(json.dumps(out))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings: Linux only")
def test_freed_blocks_are_reused_inside_the_block_and_handed_back_after_it():
    done = subprocess.run(
        [sys.executable, "-c", CHILD.format(root=str(ROOT))], capture_output=True, text=True, check=True
    )
    faults = json.loads(done.stdout.strip().splitlines()[-1])
    if not faults["kept"]:
        pytest.skip("this C library has no working mallopt (not glibc)")
    pages = (64 << 20) // 4096
    assert faults["before"] > 5 * pages, f"glibc's default should unmap each freed 64 MiB block: {faults}"
    assert faults["inside"] < pages, f"kept memory should be reused without page faults: {faults}"
    assert faults["nested"] and faults["after_nested"] < pages, f"a nested block's exit keeps the outer's: {faults}"
    assert faults["disabled"] is False
    assert faults["after"] > 4 * 4 * pages, f"after the block large freed blocks go back to the OS again: {faults}"


def test_the_restored_settings_are_the_ones_the_process_started_with(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    for variable in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"):
        monkeypatch.delenv(variable, raising=False)
    assert startup_settings() == ((-4, 65536), (-1, 128 * 1024), (-2, 128 * 1024))  # glibc's documented defaults
    monkeypatch.setenv("MALLOC_TOP_PAD_", "4096")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=0x100000:x=y")
    assert startup_settings() == ((-4, 0), (-1, 1 << 20), (-2, 4096))
    monkeypatch.setenv("MALLOC_TOP_PAD_", "lots")  # glibc ignores what it cannot read: so does the restore
    assert dict(startup_settings())[-2] == 128 * 1024


def test_a_disabled_block_changes_nothing():
    open_before = KeepFreedMemory._open  # an earlier in-process run of the suite may still hold a block
    with KeepFreedMemory(enabled=False) as kept:
        assert kept is False and KeepFreedMemory._open == open_before
    assert KeepFreedMemory._open == open_before
