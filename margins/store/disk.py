"""A full disk: how to recognise it (`disk_full`) and the one line that says so (`disk_full_error`), for every writer
of a result folder."""

from __future__ import annotations

import errno
import re
import shutil
from pathlib import Path

from common.errors import InputError

_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")  # numpy's message for a short write (errno None)


def disk_full(err: OSError) -> bool:
    """Whether `err` says the disk (or the quota) is full: ENOSPC, EDQUOT, or numpy's errno-less short write."""
    return err.errno in (errno.ENOSPC, errno.EDQUOT) or (err.errno is None and bool(_SHORT_WRITE.search(str(err))))


def disk_full_error(folder: Path, needed_bytes: int) -> InputError:
    """The one line for a full disk: the folder, the space free and the space the run still needs."""
    try:
        free = shutil.disk_usage(folder if Path(folder).exists() else Path(folder).parent).free
    except OSError:
        free = 0
    return InputError(
        f"no space left on the disk holding {folder} ({_size(free)} free; the run needs about {_size(needed_bytes)} "
        "more): free space, then run the same command again to resume (committed chunks are kept)"
    )


def _size(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"
