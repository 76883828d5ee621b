"""Never hung, never falsely successful: what keeps the processes of a margin run honest with each other.

A run's processes (ranks) share its result folder. In `<folder>/chunks/`:
- `.alive-rank<r>`: touched every `HEARTBEAT` seconds by rank r's watchdog thread while it works;
- `.done-rank<r>`: rank r finished its share of the chunks;
- `.stop`: why the run stops (JSON: exit code, message, rank), written by the rank that found out.
Every watchdog polls them: a stop file written during this run, or a peer whose heartbeat stopped for
`PEER_TIMEOUT` seconds (or that never started within `START_TIMEOUT`), stops its process: the watchdog raises
`RunStopped` in the main thread (`common.stop.request_stop`), and the command's main() ends the process with the
stop's exit code and, on the main process, one line saying which rank and why (a main thread stuck in a C call is
ended by the command's `common.stop.CommandExit` within its grace period). A signal received by a rank writes the
stop file first (the watchdog's `stop_signals` reaction). So a signal to one rank, a killed rank, a user error or a
full disk found on any rank ends every process within seconds (`PEER_TIMEOUT` for a rank that vanished without a
word), and the exit code says what happened (`EXIT_CODES`). Committed chunks are kept: the same command resumes.

A stop file counts for the run that wrote it (`run_id`: shared by the ranks of one launch, new for the next);
heartbeats count when written after this process started, and are compared on the folder's own filesystem clock
(file modification times), so ranks on several nodes agree. Where this
process started the others itself (Lightning's launcher for `--devices 2`), it also watches them directly and
names a child that died (`watch_children`). `FolderLock` keeps a second run out of a folder in use (fcntl; a dead
holder's lock is released by the kernel).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from common.errors import InputError
from common.stop import EXIT_SIGINT, EXIT_SIGTERM, EXIT_SIGUSR1, RunStopped, request_stop, stop_signals
from common.stop import env_rank as env_rank

EXIT_OK, EXIT_BUG, EXIT_BAD_INPUT, EXIT_PEER_LOST = 0, 1, 2, 3
EXIT_CODES = {
    EXIT_OK: "every result file is written",
    EXIT_BUG: "a bug: its traceback is shown",
    EXIT_BAD_INPUT: "bad input (a flag, a file, a folder, a full disk): the line `error: ...` says what to fix",
    EXIT_PEER_LOST: "a process of the run was lost (killed, out of memory, its node failed): rerun to resume",
    EXIT_SIGINT: "stopped by SIGINT (Ctrl-C): committed chunks are kept, rerun the same command to resume",
    EXIT_SIGUSR1: "stopped by SIGUSR1 (SLURM requeue): the job is requeued and resumes",
    EXIT_SIGTERM: "stopped by SIGTERM: committed chunks are kept, rerun the same command to resume",
}
SIGNAL_EXITS = {signal.SIGINT: EXIT_SIGINT, signal.SIGUSR1: EXIT_SIGUSR1, signal.SIGTERM: EXIT_SIGTERM}
HEARTBEAT = 2.0  # seconds between heartbeats
PEER_TIMEOUT = 60.0  # a peer silent this long is lost
START_TIMEOUT = 600.0  # a peer that never started within this time is lost (imports, data, rendezvous)
LOCK_WAIT = 30.0  # seconds a run waits for a folder another run holds
STOP_FILE, LOCK_FILE = ".stop", ".lock"
RESUME = "committed chunks are kept; run the same command to resume"
_CHILDREN: list = []  # the subprocess.Popen of the ranks this process started (watch_children)
STOPPED: list[int] = []  # the exit code, once this process wrote the run's stop file (it then ends on its own)


def run_id() -> str:
    """What the ranks of one launch share and the next launch does not: torchrun's run id and restart count,
    SLURM's job, step and restart count, else a fresh id this process hands to the ranks it starts (environment
    variable MARGINS_RUN_ID, inherited by Lightning's launcher's children)."""
    env = os.environ
    if "MARGINS_RUN_ID" not in env:
        if "TORCHELASTIC_RUN_ID" in env:
            env["MARGINS_RUN_ID"] = f"torchrun-{env['TORCHELASTIC_RUN_ID']}-{env.get('TORCHELASTIC_RESTART_COUNT', 0)}"
        elif "SLURM_JOB_ID" in env:
            step, restart = env.get("SLURM_STEP_ID", "-"), env.get("SLURM_RESTART_COUNT", "0")
            env["MARGINS_RUN_ID"] = f"slurm-{env['SLURM_JOB_ID']}-{step}-{restart}"
        else:
            env["MARGINS_RUN_ID"] = uuid.uuid4().hex
    return env["MARGINS_RUN_ID"]


def process_start_time() -> float:
    """When this process started (seconds since the epoch; Linux /proc), else now."""
    try:
        with open("/proc/self/stat") as stat:
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as machine:
            boot = next(int(line.split()[1]) for line in machine if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration, IndexError):
        return time.time()


def watch_children(processes: list) -> None:
    """The ranks this process started (`subprocess.Popen`): its watchdog names one that dies at once."""
    _CHILDREN[:] = list(processes)


class Watchdog:
    """Rank `rank` of `world_size` working in `folder` (module docstring). Use as a context manager (in the main
    thread, it also handles SIGTERM, SIGUSR1 and SIGINT: `signals`; with `requeue`, rank 0 requeues the SLURM job
    on SIGUSR1); `done()` when the rank's share is committed; `write_stop(code, message)` to end the run
    everywhere (the writer raises its own stop)."""

    def __init__(
        self, folder: Path, rank: int, world_size: int, poll: float = 0.5, requeue: bool = False, signals: bool = True
    ):
        self.folder, self.rank, self.world_size, self.poll = Path(folder), rank, world_size, poll
        self.requeue, self.signals = requeue, signals
        self.run = run_id()
        self.start = process_start_time() - 2.0  # heartbeats written since (clock slack) belong to this run
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None
        self._handling = contextlib.ExitStack()

    def __enter__(self) -> Watchdog:
        STOPPED.clear()  # a new run of this process (the Python API may run several)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._touch(f".alive-rank{self.rank}")
        if self.signals:
            self._handling.enter_context(stop_signals(self._on_signal))
        self._thread = threading.Thread(target=self._watch, name=f"margins-watchdog-{self.rank}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._finished.set()
        if self._thread is not None:
            self._thread.join()
        self._handling.close()

    def _on_signal(self, signum: int) -> RunStopped:
        """A stop signal received by this rank (in the main thread): requeue the SLURM job on SIGUSR1 (rank 0, with
        `requeue`), write the stop file, so that every rank stops within a poll; the stop this process raises."""
        requeued = ""
        if signum == signal.SIGUSR1 and self.requeue and self.rank == 0:
            requeued = " and requeued the job" if _slurm_requeue() else " (requeueing the job failed)"
        message = f"rank {self.rank} received {signal.Signals(signum).name}{requeued}; {RESUME}"
        self.write_stop(SIGNAL_EXITS[signum], message)
        return RunStopped(SIGNAL_EXITS[signum], message)

    def done(self) -> None:
        """This rank's share is committed: peers stop expecting its heartbeat."""
        self._touch(f".done-rank{self.rank}")

    def write_stop(self, code: int, message: str) -> None:
        """The stop file: every other rank ends with `code` within a poll; the caller ends this process (this
        process's watchdog no longer acts)."""
        STOPPED.append(code)
        record = json.dumps({"code": code, "message": message, "rank": self.rank, "run": self.run})
        tmp = self.folder / f"{STOP_FILE}.tmp-{os.getpid()}"
        try:
            with open(tmp, "w") as file:
                file.write(record)
            os.replace(tmp, self.folder / STOP_FILE)
        except OSError:  # a full disk refused the text: an empty stop file (no space needed) still stops the run
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                open(self.folder / STOP_FILE, "w").close()

    def check(self) -> None:
        """Raise RunStopped when the run stops (a stop file of this run, or a lost peer)."""
        stop = self._stop_record()
        if stop is not None:
            raise RunStopped(*stop)
        code, lost = self._dead_child() or (EXIT_PEER_LOST, self._lost_peer())
        if lost is not None:
            message = f"{lost}; {RESUME}"
            if code == EXIT_BAD_INPUT:
                message = f"error: {lost} (its message is above)"
            self.write_stop(code, message)
            raise RunStopped(code, message)

    # ---- the thread ------------------------------------------------------------------------------------------
    def _watch(self) -> None:
        last_beat, stopping = time.monotonic(), False
        while not self._finished.wait(self.poll):
            if time.monotonic() - last_beat >= HEARTBEAT:
                self._touch(f".alive-rank{self.rank}")
                last_beat = time.monotonic()
            if STOPPED or stopping:
                continue  # this process is ending
            try:
                self.check()
            except RunStopped as stop:
                stopping = True
                request_stop(stop)  # the main thread raises it; the command's main() ends the process

    def _stop_record(self) -> tuple[int, str] | None:
        """The stop file's (code, message) when another rank wrote it during this run."""
        path, mtime = self.folder / STOP_FILE, 0.0
        try:
            mtime = path.stat().st_mtime
            record = json.loads(path.read_text() or "null")
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError):
            record = None
        if record is None:  # a full disk left it empty: it counts when written since this process started
            record = {"run": self.run if mtime >= self.start else None}
        if not isinstance(record, dict) or record.get("run") != self.run:
            return None  # another run's, or no run's: only a stop file with this run's id counts
        if record.get("rank") == self.rank:
            return None  # written by this process, which ends itself
        code = int(record.get("code", EXIT_BAD_INPUT))
        return code, str(record.get("message", "another rank stopped the run"))

    def _dead_child(self) -> tuple[int, str] | None:
        """(exit code for the run, what happened) for a child rank that ended with an error, else None."""
        for number, process in enumerate(_CHILDREN, start=1):
            code = process.poll()
            if code:
                how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
                if code in SIGNAL_EXITS.values():
                    how = f"was stopped by {signal.Signals(code - 128).name} (exit {code})"
                run_code = code if code in (EXIT_BAD_INPUT, *SIGNAL_EXITS.values()) else EXIT_PEER_LOST
                if code < 0 and -code in SIGNAL_EXITS:  # a stop signal before its handler was in: the same stop
                    run_code = SIGNAL_EXITS[-code]
                return run_code, f"rank {number} (process {process.pid}) {how}"
        return None

    def _lost_peer(self) -> str | None:
        now = self._now()
        for peer in range(self.world_size):
            if peer == self.rank or self._since(f".done-rank{peer}") is not None:
                continue
            beat = self._since(f".alive-rank{peer}")
            if beat is not None and now - beat > PEER_TIMEOUT:
                silent = f"no heartbeat for {PEER_TIMEOUT:.0f} s: killed, out of memory, or its node failed"
                return f"rank {peer} stopped answering ({silent})"
            if beat is None and now - self.start > START_TIMEOUT:
                return f"rank {peer} never started (no heartbeat within {START_TIMEOUT:.0f} s)"
        return None

    def _since(self, name: str) -> float | None:
        """The modification time of `name` when it was written during this run, else None."""
        try:
            mtime = (self.folder / name).stat().st_mtime
        except FileNotFoundError:
            return None
        return mtime if mtime >= self.start else None

    def _touch(self, name: str) -> None:
        with contextlib.suppress(OSError):
            path = self.folder / name
            path.touch()
            os.utime(path)

    def _now(self) -> float:
        """The folder's filesystem clock: the modification time of this rank's heartbeat, just touched."""
        path = self.folder / f".clock-rank{self.rank}"
        try:
            path.touch()
            os.utime(path)
            return path.stat().st_mtime
        except OSError:
            return time.time()


def remove_markers(folder: Path) -> None:
    """Before a run's ranks start, and after a finished run: heartbeats, done marks and clock files, and the stop
    file of an earlier (stopped) run."""
    for pattern in (".alive-rank*", ".done-rank*", ".clock-rank*", STOP_FILE, f"{STOP_FILE}.tmp-*"):
        for path in Path(folder).glob(pattern):
            with contextlib.suppress(OSError):
                path.unlink()


def _slurm_requeue() -> bool:
    job = os.environ.get("SLURM_JOB_ID")
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    if not job:
        return False
    import subprocess

    try:
        return subprocess.run(["scontrol", "requeue", job], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


class FolderLock:
    """An exclusive lock on a result folder for the run's main process: fcntl on `<folder>/.lock`, a file naming
    the holder, removed when the run ends. A second run waits up to `wait` seconds, then raises InputError naming
    the holder; a dead holder's lock is released by the kernel, so it never blocks."""

    def __init__(self, folder: Path, wait: float = LOCK_WAIT):
        self.path, self.wait = Path(folder) / LOCK_FILE, wait
        self._file = None

    def __enter__(self) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline, told = time.monotonic() + self.wait, False
        while True:
            handle = open(self.path, "a+")  # noqa: SIM115 - held until __exit__
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if self._current(handle):
                    break
                handle.close()  # the holder removed the file as it ended: lock the new one
                continue
            except BlockingIOError:
                holder = self._holder(handle)
                handle.close()
            if time.monotonic() >= deadline:
                raise InputError(
                    f"{self.path.parent} is in use by {holder}; wait for it to finish, or choose another output folder"
                )
            if not told:
                print(f"waiting for {holder}, which holds {self.path.parent}", file=sys.stderr, flush=True)
                told = True
            time.sleep(0.5)
        handle.seek(0)
        handle.truncate()
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join(sys.argv)}  # fmt: skip
        handle.write(json.dumps(holder))
        handle.flush()
        self._file = handle
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()  # before the lock goes: a waiter then locks a fresh file
            self._file.close()
            self._file = None

    def _current(self, handle) -> bool:
        """Whether the locked file is still the one at the path (not removed by a holder that just ended)."""
        try:
            return os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            return False

    @staticmethod
    def _holder(handle) -> str:
        try:
            handle.seek(0)
            record = json.loads(handle.read() or "{}")
            return f"process {record['pid']} on {record['host']} (since {record['since']}: {record['command']})"
        except (OSError, ValueError, KeyError):
            return "another process"
