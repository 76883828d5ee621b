"""Keep freed memory in the process instead of handing it back to the OS after every large tensor (glibc).

glibc's malloc serves large blocks (above 128 KiB-32 MiB, adaptively) with `mmap` and unmaps them on `free`,
so every new large tensor costs fresh page faults, one per 4 KiB page on first touch. An attack allocates the
same large activation and gradient maps at every step: on ResNet-50 at 224x224 (1 CPU thread) a fifth of the
run was kernel time in those faults (`benchmarks/bench_deepfool.py --cases resnet50 --keep-freed-memory`:
104.6 -> 82.6 s, system time 43 -> 3.5 s). Inside `with KeepFreedMemory():` large blocks come from the heap and
stay there once freed, to be reused: the process keeps its peak footprint while the block runs, values are
unchanged.

malloc's settings belong to the whole process, so the block is for a process's own run (a command, a worker),
not for code that shares the process with other work. On exit the settings the process started with come back
(glibc's defaults, or what its `GLIBC_TUNABLES` / `MALLOC_*_` environment set; mallopt has no getter, so a change
other code made before the block is not seen) and the kept heap is trimmed at the next free; one difference
stays: glibc's mmap threshold no longer adapts to the program (any mallopt call fixes it where it stands).
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import ClassVar

# glibc's mallopt parameters (malloc.h), their GLIBC_TUNABLES and environment names, and glibc's defaults
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
_STARTUP = (  # (parameter, tunable, environment variable, glibc's default)
    (M_MMAP_MAX, "glibc.malloc.mmap_max", "MALLOC_MMAP_MAX_", 65536),
    (M_TRIM_THRESHOLD, "glibc.malloc.trim_threshold", "MALLOC_TRIM_THRESHOLD_", 128 * 1024),
    (M_TOP_PAD, "glibc.malloc.top_pad", "MALLOC_TOP_PAD_", 128 * 1024),
)
NEVER_TRIM = 2**31 - 1  # mallopt takes an int: free heap top kept up to 2 GiB
TOP_PAD = 64 << 20  # grow the heap 64 MiB at a time
KEEP = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, NEVER_TRIM), (M_TOP_PAD, TOP_PAD))


class KeepFreedMemory:
    """`with KeepFreedMemory(enabled) as kept:` large blocks from the heap, never unmapped, freed heap memory kept
    (glibc on Linux) inside the block, the process's starting settings back on exit (module docstring). `kept`:
    whether the settings are in effect (False when not `enabled`, and elsewhere: macOS, Windows, musl). Blocks may
    nest (the outermost one sets and restores); one thread opens them."""

    _open: ClassVar[int] = 0  # blocks in effect in this process: malloc's settings are process-wide

    def __init__(self, enabled: bool = True):
        self.enabled = bool(enabled)
        self.kept = False

    def __enter__(self) -> bool:
        if self.enabled and (KeepFreedMemory._open > 0 or _set(KEEP)):
            KeepFreedMemory._open += 1
            self.kept = True
        return self.kept

    def __exit__(self, *exc) -> None:
        if not self.kept:
            return
        self.kept = False
        KeepFreedMemory._open -= 1
        if KeepFreedMemory._open == 0:
            _set(startup_settings())


def can_keep_freed_memory() -> bool:
    """Whether `KeepFreedMemory` takes effect in this process (glibc on Linux), without changing anything."""
    return _mallopt() is not None


def startup_settings() -> tuple[tuple[int, int], ...]:
    """`(parameter, value)` of the settings `KeepFreedMemory` changes, as this process started: glibc's defaults
    unless `GLIBC_TUNABLES` or the `MALLOC_*_` environment variables set them."""
    tunables = dict(
        item.split("=", 1) for item in os.environ.get("GLIBC_TUNABLES", "").split(":") if item.count("=") == 1
    )
    out = []
    for param, tunable, variable, default in _STARTUP:
        text = tunables.get(tunable, os.environ.get(variable, "")).strip()
        out.append((param, int(text, 0) if _is_int(text) else default))
    return tuple(out)


def _is_int(text: str) -> bool:
    try:
        int(text, 0)
    except ValueError:
        return False
    return True


def _mallopt():
    """glibc's `mallopt`, or None where there is none (another OS or C library: musl's is a stub)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):  # glibc only
        return None
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def _set(settings: tuple[tuple[int, int], ...]) -> bool:
    """Apply `(parameter, value)` settings with mallopt; whether every one took effect."""
    mallopt = _mallopt()
    return mallopt is not None and all(mallopt(param, value) == 1 for param, value in settings)
