"""Keep freed memory in the process instead of handing it back to the OS after every large tensor (glibc).

glibc's malloc serves large blocks (above 128 KiB-32 MiB, adaptively) with `mmap` and unmaps them on `free`,
so every new large tensor costs fresh page faults, one per 4 KiB page on first touch. An attack allocates the
same large activation and gradient maps at every step: on ResNet-50 at 224x224 (1 CPU thread) a fifth of the
run was kernel time in those faults (`benchmarks/bench_deepfool.py --cases resnet50 --keep-freed-memory`:
104.6 -> 82.6 s, system time 43 -> 3.5 s). With `keep_freed_memory()` large blocks come from the heap and stay
there once freed, to be reused: the process keeps its peak footprint until it exits (what a margin run reaches
anyway), values are unchanged. Process-wide and not undone: for command-line runs, not for library calls.
"""

from __future__ import annotations

import ctypes
import functools
import sys

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
NEVER_TRIM = 2**31 - 1  # mallopt takes an int: free heap top kept up to 2 GiB
TOP_PAD = 64 << 20  # grow the heap 64 MiB at a time


@functools.cache  # once per process: later calls only report
def keep_freed_memory() -> bool:
    """Large blocks from the heap, never unmapped; freed heap memory kept (glibc on Linux). Returns whether the
    settings took effect (False elsewhere: macOS, Windows, musl; nothing changes there)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, NEVER_TRIM), (M_TOP_PAD, TOP_PAD))
    return all(mallopt(param, value) == 1 for param, value in settings)  # musl's stub returns 0
