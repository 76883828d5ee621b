"""How a `train.py` run (one process or many) ends: on a signal, a lost process or a failed rank, with which exit
status and which line. train.py's `cli()` owns it (`TrainingControl`, the command boundary); library code raises.

What Lightning 2.6 leaves open for a multi-process fit (`lightning/pytorch/trainer/connectors/signal_connector.py`
and the launcher of `--trainer.devices N`):
- its SIGTERM handler calls `dist.broadcast(src=0)` inside the handler, on the signalled rank alone: with one rank
  signalled, that broadcast is paired with whatever collective the others run next (a hang, or a gloo error);
- its loops then raise `SIGTERMException` on each signalled rank by itself (after its batch), while the others wait
  in their next collective; `SIGTERMException` is a `SystemExit` without a code: a preempted fit exits 0;
- under SLURM its SIGUSR1 handler saves a checkpoint (a collective) inside the handler, wherever each rank is;
- its launcher's child-process observer SIGKILLs the main process when a child dies, saying nothing (exit 137).
So Lightning registers no handler here (`TrainingControl.adopt`), its launcher runs without the observer, and:

1. The command's stop handling is `common.stop`'s (train.py's `CommandExit`). While the trainer runs, a stop signal
   (SIGTERM, SIGUSR1, SIGINT) is recorded, never acted on where it lands (`stop_signals(defer=True)`); SIGTERM and
   SIGUSR1 are also seen while the main thread is blocked in a C call (a collective): a thread reads the signals'
   wakeup fd. Before the trainer runs (parsing, loading, starting the ranks) a stop ends the command at once.
2. Every rank meets at the same points, the start of each training, validation and test batch, the end of a
   validation or test epoch (before the margin measurement) and the end of training, for an all-reduce of the
   recorded stops (`StopAgreement`); when any rank has one, every rank raises it there, together, and Lightning
   tears down as for any exception. Under SLURM with auto-requeue, SIGUSR1 first runs Lightning's own requeue
   there (its HPC checkpoint in `default_root_dir`, `scontrol requeue`), on every rank.
3. A margin measurement (no collectives inside) stops at once, through its own watchdog (`margins.run.guard`); a rank
   that is not measuring at that moment learns why from the run's stop file (`<run folder>/.stop`, this run's id
   only), which the rank that stopped first writes. A SIGUSR1 under SLURM that stops a measurement has no point
   where every rank meets: rank 0 hands the last checkpoint to Lightning as its HPC checkpoint and requeues.
4. A lost rank: the main process watches the ranks it started and names the one that died (exit 3); a collective
   with a lost rank fails (gloo: at once; otherwise after `COLLECTIVE_TIMEOUT`).
5. The bound: `CommandExit`'s last resort ends a process still running `GRACE` seconds after its stop (its main
   thread stuck in a C call), with the same exit status.

The main process prints one line, `stopped: rank R <cause>; resume with: <the command> --ckpt_path <checkpoint>`
(the last checkpoint saved, whole: Lightning writes checkpoints atomically). Exit status: 143 SIGTERM, 130 SIGINT,
138 SIGUSR1, 3 a lost process, 1 or 2 a rank failed (a bug, bad input); 0 only for a finished subcommand.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.distributed import _set_num_threads_if_needed
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from torch.distributed.constants import default_pg_timeout

from common.errors import InputError
from common.stop import (
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_SIGUSR1,
    RERUN,
    RunStopped,
    env_rank,
    request_stop,
    stop_signals,
)
from margins.run.guard import EXIT_BAD_INPUT, EXIT_BUG, EXIT_PEER_LOST, RESUME, START_TIMEOUT, run_id

SIGNAL_EXITS = {signal.SIGTERM: EXIT_SIGTERM, signal.SIGUSR1: EXIT_SIGUSR1, signal.SIGINT: EXIT_SIGINT}
CODE_SIGNALS = {code: signal.Signals(signum).name for signum, code in SIGNAL_EXITS.items()}
GRACE = 60.0  # seconds a process has to end after its stop (a step, Lightning's HPC checkpoint, the teardown)
CHILDREN_WAIT = 15.0  # seconds the main process waits for the ranks it started to end, before it kills them
LOST_CHILD_WAIT = 5.0  # seconds, after a failed collective, for a rank it started to be seen ended (its cause)
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=START_TIMEOUT)  # DDP's collectives (Lightning's default: 30 min)
STOP_FILE = ".stop"
RANK_BITS = 16  # an agreed stop is `code << RANK_BITS | (RANK_MASK - rank)`: the highest code, then the lowest rank
RANK_MASK = (1 << RANK_BITS) - 1
LOST = "a process of the run was lost"  # a stop's cause when this process only saw another one go (no rank named)
_FAILURES = {EXIT_BUG: "failed", EXIT_BAD_INPUT: "stopped on bad input", EXIT_PEER_LOST: "was lost"}


class TrainingControl:
    """A train.py process's handling of stops (module docstring), inside the command's `CommandExit`: a watching
    thread and the signals' wakeup fd while inside the block, `adopt(trainer)` for the trainer it runs, and
    `outcome(error)`: the stop, with its line, for what ended the command. `argv`: the command's arguments (for the
    command that resumes)."""

    def __init__(self, argv: list[str], poll: float = 0.2):
        self.argv, self.poll = list(argv), poll
        self.rank, self.world_size = env_rank(), 1
        self.run = run_id()  # Lightning's launcher hands it to the ranks it starts (their environment)
        self.stop: RunStopped | None = None  # the stop of this process, once there is one
        self.stop_rank = -1  # the rank where its cause is
        self.trainer: L.Trainer | None = None
        self.folder: Path | None = None  # the run folder, once the trainer set up (its stop file)
        self.children: list[Any] = []  # the ranks Lightning's launcher started here (subprocess.Popen)
        self.requeued: str | None = None  # after a SLURM requeue: what the line says
        self._lock = threading.Lock()
        self._deferring = contextlib.ExitStack()
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None
        self._wakeup: tuple[int, int] | None = None
        self._previous_wakeup = -1

    # ---- the block ---------------------------------------------------------------------------------------------
    def __enter__(self) -> TrainingControl:
        if threading.current_thread() is threading.main_thread():
            read, write = os.pipe()
            os.set_blocking(read, False)
            os.set_blocking(write, False)
            self._wakeup = (read, write)
            self._previous_wakeup = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
            os.register_at_fork(after_in_child=_forget_wakeup)
        self._thread = threading.Thread(target=self._watch, name="train-stop-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._deferring.close()
        self._finished.set()
        if self._thread is not None:
            self._thread.join()
        if self._wakeup is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
            for fd in self._wakeup:
                os.close(fd)
            self._wakeup = None
        self._end_children(CHILDREN_WAIT)

    # ---- the trainer -------------------------------------------------------------------------------------------
    def adopt(self, trainer: L.Trainer) -> None:
        """Before `trainer` runs: Lightning's signal handlers off, collectives bounded, the launcher's children
        watched here, and the ranks' meeting points (`StopAgreement`, first among the callbacks)."""
        self.trainer = trainer
        # no public switch turns Lightning's signal handling off (module docstring): its connector registers nothing
        trainer._signal_connector.register_signal_handlers = lambda: None
        strategy = trainer.strategy
        if isinstance(strategy, DDPStrategy) and strategy._timeout == default_pg_timeout:
            strategy._timeout = COLLECTIVE_TIMEOUT  # set before the process group exists (the trainer's run)
        if type(strategy.launcher) is _SubprocessScriptLauncher:
            strategy._launcher = _WatchedLauncher(strategy.launcher, self)
        trainer.callbacks.insert(0, StopAgreement(self))

    def arm(self, trainer: L.Trainer) -> None:
        """Every rank, in the trainer's setup: the run folder (a broadcast from rank 0), the ranks' numbers, and
        from now on stops wait for the ranks' next meeting point."""
        folder = trainer.log_dir or trainer.default_root_dir
        self.folder = Path(folder) if folder else None
        self.rank, self.world_size = trainer.global_rank, trainer.world_size
        self._deferring.close()
        self._deferring.enter_context(stop_signals(self._reaction, defer=True))

    def disarm(self) -> None:
        """The trainer is done: a stop ends the command at once again."""
        self._deferring.close()

    # ---- recording a stop ----------------------------------------------------------------------------------------
    def record(self, stop: RunStopped, origin: int, agreed: bool = False, notify: bool = True) -> bool:
        """Keep `stop` (whose cause is on rank `origin`) if it is this process's first, or the one every rank agreed
        on; tell the other ranks (the run's stop file) and, with `notify`, the command's stop handling (a margin
        measurement in progress raises it at once; the last resort is armed). A stop that names its cause on another
        rank replaces one that only saw a process go (`LOST`). Whether it was kept."""
        with self._lock:
            named = self.stop is not None and origin != self.rank and _names_cause(stop) and not _names_cause(self.stop)
            if self.stop is not None and not agreed and not named:
                return False
            first, self.stop, self.stop_rank = self.stop is None, stop, origin
        self.write_stop_file(stop, origin)
        if notify and first:
            request_stop(self.final(stop))
        return True

    def _reaction(self, signum: int) -> RunStopped:
        """A stop signal received while the trainer runs (common.stop calls it in the main thread, and keeps what
        it returns for the last resort's line)."""
        self.record(signal_received(signum, self.rank), self.rank, notify=False)
        return self.final(self.stop)

    def write_stop_file(self, stop: RunStopped, origin: int) -> None:
        """The run's stop file (code, message, the writer's rank, the cause's rank, the run id), unless another
        rank's is there."""
        if self.folder is None or self._stop_file_record() is not None:
            return
        record = json.dumps({"code": stop.code, "message": stop.message, "rank": self.rank, "origin": origin,
                             "run": self.run})  # fmt: skip
        tmp = self.folder / f"{STOP_FILE}.tmp-{os.getpid()}"
        with contextlib.suppress(OSError):
            tmp.write_text(record)
            os.replace(tmp, self.folder / STOP_FILE)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)

    def failed_here(self, error: BaseException) -> None:
        """This rank's run raised `error` (Lightning's `on_exception`): other ranks learn why from the stop file."""
        if self.stop is not None or isinstance(error, RunStopped):
            return
        if isinstance(error, InputError):
            code, message = EXIT_BAD_INPUT, f"error: {' '.join(str(error).split())}"
        elif self.world_size > 1 and collective_failed(error):  # another rank is gone: this one did not fail
            code, message = EXIT_PEER_LOST, f"{LOST} (a collective failed: {_first_line(error)})"
        else:
            code, message = EXIT_BUG, f"rank {self.rank} failed: {type(error).__name__}: {_first_line(error)}"
        self.write_stop_file(RunStopped(code, message), self.rank)

    # ---- the ranks' meeting ------------------------------------------------------------------------------------
    def encoded(self) -> int:
        """This process's stop for the all-reduce (0: none)."""
        stop = self.stop
        return 0 if stop is None else stop.code << RANK_BITS | (RANK_MASK - max(self.stop_rank, 0))

    def agreed(self, value: int) -> RunStopped:
        """The stop every rank raises for the all-reduced `value`: this process's own when it is the one agreed."""
        code, rank = value >> RANK_BITS, RANK_MASK - (value & RANK_MASK)
        stop = self.stop
        if stop is None or stop.code != code or max(self.stop_rank, 0) != rank:
            cause = f"received {CODE_SIGNALS[code]}" if code in CODE_SIGNALS else _FAILURES.get(code, "stopped")
            stop = RunStopped(code, f"rank {rank} {cause}")
            self.record(stop, rank, agreed=True)
        return stop

    def requeue(self, trainer: L.Trainer) -> None:
        """Under SLURM with auto-requeue: Lightning's own requeue (its SIGUSR1 handler: loggers finalized, the HPC
        checkpoint saved into `default_root_dir`, `scontrol requeue` on rank 0), run where every rank agreed to stop
        instead of inside the signal handler wherever each rank was."""
        if not slurm_requeues(trainer):
            return
        trainer._signal_connector._slurm_sigusr_handler_fn(signal.SIGUSR1, None)
        saved = sorted(Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt"), key=_hpc_number)
        where = f"Lightning saved {saved[-1]} and " if saved else "Lightning "
        self.requeued = f"{where}requeued SLURM job {slurm_job()}, which resumes from it"

    def requeue_from_last_checkpoint(self) -> None:
        """Rank 0, for a SIGUSR1 that stopped a margin measurement under SLURM: Lightning's requeue needs every rank
        at one point (its checkpoint is a collective), which a measurement (no collectives) does not give. The last
        checkpoint becomes Lightning's next HPC checkpoint (a requeued job resumes from the newest
        `hpc_ckpt_N.ckpt` in `default_root_dir`) and the job is requeued as Lightning does (`scontrol requeue`)."""
        trainer = self.trainer
        if self.rank != 0 or self.requeued or trainer is None or not slurm_requeues(trainer):
            return
        root, last = Path(trainer.default_root_dir), self.checkpoint()
        saved = ""
        if last is not None:
            number = max((_hpc_number(p) for p in root.glob("hpc_ckpt_*.ckpt")), default=0) + 1
            target, tmp = root / f"hpc_ckpt_{number}.ckpt", root / f".hpc_ckpt_{number}.ckpt.tmp-{os.getpid()}"
            shutil.copyfile(last, tmp)
            os.replace(tmp, target)
            saved = f"{last} copied to {target} and "
        done = subprocess.run(["scontrol", "requeue", slurm_job()], capture_output=True, timeout=60).returncode == 0
        requeued = f"requeued SLURM job {slurm_job()}" if done else f"requeueing SLURM job {slurm_job()} failed"
        self.requeued = f"{saved}{requeued}, which resumes from it"

    # ---- the thread ------------------------------------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._finished.is_set():
            self._read_wakeup()
            self._check_stop_file()
            self._check_children()

    def _read_wakeup(self) -> None:
        """SIGTERM and SIGUSR1 delivered to this process, also while its main thread is blocked in a C call (the
        signal's Python handler then waits for it). SIGINT is left to its handler: a margin measurement's watchdog
        interrupts the main thread with it (`common.stop.request_stop`), which is no Ctrl-C."""
        if self._wakeup is None:
            self._finished.wait(self.poll)
            return
        ready, _, _ = select.select([self._wakeup[0]], [], [], self.poll)
        if not ready:
            return
        with contextlib.suppress(BlockingIOError):
            for signum in os.read(self._wakeup[0], 64):
                if signum in (signal.SIGTERM, signal.SIGUSR1):
                    self.record(signal_received(signum, self.rank), self.rank)

    def _check_stop_file(self) -> None:
        record = self._stop_file_record()
        if record is not None and self.stop is None:
            self.record(RunStopped(int(record["code"]), str(record["message"])), int(record["origin"]))

    def _stop_file_record(self) -> dict | None:
        """The run's stop file when another rank of this run wrote it."""
        if self.folder is None:
            return None
        try:
            record = json.loads((self.folder / STOP_FILE).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("run") != self.run or record.get("rank") == self.rank:
            return None
        return record if {"code", "message", "origin"} <= set(record) else None

    def _check_children(self) -> bool:
        """A rank this process started that ended with an error is the run's stop (one that names its cause replaces
        one that ended only because it lost a peer). Whether every rank it started has ended."""
        ended = True
        for number, process in enumerate(self.children, start=1):
            code = process.poll()
            ended = ended and code is not None
            if code:
                self.record(_child_stop(number, process.pid, code), number)
        return ended

    def _await_lost_child(self, wait: float) -> None:
        """After a collective failed here: up to `wait` seconds for a rank this process started to be seen ended
        with its own cause (a signal, an error), which is then the recorded stop. A killed rank's sockets close
        before its parent can collect its status, so the collective can fail first; a rank that ended only because
        it lost a peer too (EXIT_PEER_LOST) names no cause, and a loss on another node leaves the ranks here
        running: then the wait runs out and the cause stays `LOST`."""
        deadline = time.monotonic() + wait
        while self.children and (self.stop is None or not _names_cause(self.stop)):
            self._check_stop_file()
            if self._check_children() or time.monotonic() >= deadline:
                return
            time.sleep(0.02)

    def _end_children(self, wait: float) -> None:
        """The ranks this process started: given `wait` seconds to end, then killed."""
        deadline = time.monotonic() + wait
        for process in self.children:
            with contextlib.suppress(Exception):
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            if process.poll() is None:
                process.kill()

    # ---- the end ---------------------------------------------------------------------------------------------------
    def outcome(self, error: BaseException) -> RunStopped | None:
        """The stop that `error` ended the command with, its message the one line the main process prints (the
        cause, and the command that resumes); None when `error` is not a stop of the run (a bug of this rank: its
        traceback shows)."""
        self._check_stop_file()
        self._check_children()
        if isinstance(error, RunStopped):
            self.record(error, self.stop_rank if self.stop is not None else self.rank, notify=False)
        elif self.world_size > 1 and collective_failed(error) and (self.stop is None or not _names_cause(self.stop)):
            self._await_lost_child(LOST_CHILD_WAIT)
            cause = f"{LOST} (a collective failed: {_first_line(error)})"
            self.record(RunStopped(EXIT_PEER_LOST, cause), -1, notify=False)
        stop = self.stop
        if stop is None:
            return None
        if stop.code == EXIT_SIGUSR1:  # stopped inside a margin measurement: not requeued at a meeting point
            self.requeue_from_last_checkpoint()
        self._end_children(CHILDREN_WAIT)  # the ranks it started end first: the main process's line comes last
        return self.final(stop)

    def final(self, stop: RunStopped) -> RunStopped:
        """`stop` with the message the main process prints: its cause and what resumes the run."""
        cause = stop.message.removesuffix(f"; {RESUME}").removesuffix(f"; {RERUN}")
        if cause.startswith("error:"):
            return RunStopped(stop.code, cause)
        cause = cause if cause.startswith(("rank ", LOST)) else f"rank {self.stop_rank} {cause}"
        return RunStopped(stop.code, f"{cause}; {self.resume()}")

    def resume(self) -> str:
        """What to run next: the command with `--ckpt_path` of the last checkpoint (fit), or again."""
        if self.requeued:
            return self.requeued
        argv = _without_ckpt_path(self.argv)
        command = shlex.join(["python", sys.argv[0], *argv] if sys.argv[0].endswith(".py") else [sys.argv[0], *argv])
        if next((arg for arg in argv if arg in ("fit", "validate", "test", "predict")), None) != "fit":
            return f"run it again: {command}"
        checkpoint = self.checkpoint()
        if checkpoint is None:
            return f"no checkpoint was saved yet; start again: {command}"
        return f"resume with: {command} --ckpt_path {shlex.quote(checkpoint)}"

    def checkpoint(self) -> str | None:
        """The last checkpoint saved by this run (`last.ckpt`, else the latest), else the one it resumed from."""
        trainer = self.trainer
        if trainer is None:
            return None
        callback = trainer.checkpoint_callback
        for path in (getattr(callback, "last_model_path", ""), getattr(callback, "best_model_path", ""),
                     trainer.ckpt_path):  # fmt: skip
            if path and Path(path).is_file():
                return str(path)
        return None


class StopAgreement(L.Callback):
    """The ranks' meeting points (module docstring, 2): an all-reduce of the recorded stops at the start of every
    training, validation and test batch, at the end of a validation or test epoch and of training; a stop recorded
    on any rank is raised on every rank there."""

    def __init__(self, control: TrainingControl):
        self.control = control

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.control.arm(trainer)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.control.disarm()

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.meet(trainer)

    def on_validation_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.meet(trainer)

    def on_test_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.meet(trainer)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.meet(trainer)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.meet(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.meet(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.control.failed_here(exception)

    def meet(self, trainer: L.Trainer) -> None:
        value = self.control.encoded()
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            flag = torch.tensor([value], dtype=torch.int64, device=trainer.strategy.root_device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            value = int(flag.item())
        if value == 0:
            return
        stop = self.control.agreed(value)
        if stop.code == EXIT_SIGUSR1:
            self.control.requeue(trainer)
        raise stop


class _WatchedLauncher(_SubprocessScriptLauncher):
    """Lightning's launcher for `--trainer.devices N` on one machine, without its child-process observer (which
    SIGKILLs the main process when a child ends, saying nothing): the control's thread watches the children and
    names the one that died."""

    def __init__(self, original: _SubprocessScriptLauncher, control: TrainingControl):
        super().__init__(original.cluster_environment, original.num_processes, original.num_nodes)
        self.control = control

    def launch(self, function: Any, *args: Any, trainer: L.Trainer | None = None, **kwargs: Any) -> Any:
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            self._call_children_scripts()
            self.control.children = list(self.procs)
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)


def signal_received(signum: int, rank: int) -> RunStopped:
    """The stop for signal `signum` received by rank `rank`."""
    return RunStopped(SIGNAL_EXITS[signum], f"rank {rank} received {signal.Signals(signum).name}")


def slurm_requeues(trainer: L.Trainer) -> bool:
    """Whether the trainer runs under SLURM with Lightning's auto-requeue on."""
    environment = getattr(trainer.strategy, "cluster_environment", None)
    return isinstance(environment, SLURMEnvironment) and environment.auto_requeue


def slurm_job() -> str:
    """The SLURM job to requeue, as Lightning names it (an array task: `<array job>_<task>`)."""
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return os.environ.get("SLURM_JOB_ID", "")


def collective_failed(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because another process of the run is gone."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        words in text for words in ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
    )


def _child_stop(number: int, pid: int, code: int) -> RunStopped:
    """The stop for rank `number` (process `pid`) that ended with status `code` (negative: killed by a signal)."""
    if code < 0:
        name = signal.Signals(-code).name
        if -code in SIGNAL_EXITS:  # ended by the signal before its handler was in place: that signal's stop
            return RunStopped(SIGNAL_EXITS[-code], f"rank {number} (process {pid}) received {name}")
        return RunStopped(EXIT_PEER_LOST, f"rank {number} (process {pid}) was killed by {name}")
    if code in CODE_SIGNALS:
        return RunStopped(code, f"rank {number} (process {pid}) received {CODE_SIGNALS[code]}")
    if code == EXIT_BUG:
        return RunStopped(code, f"rank {number} (process {pid}) failed (its traceback is above)")
    if code == EXIT_BAD_INPUT:
        return RunStopped(code, f"rank {number} (process {pid}) stopped on bad input (its error line is above)")
    if code == EXIT_PEER_LOST:  # it lost a peer itself: a collective failed there
        return RunStopped(code, f"{LOST} (rank {number}, process {pid}, ended on losing it)")
    return RunStopped(EXIT_PEER_LOST, f"rank {number} (process {pid}) exited with status {code}")


def _names_cause(stop: RunStopped) -> bool:
    """Whether `stop` names what ended the run (a signal, an error, a rank that was killed), not only that a process
    of the run was seen to go."""
    return not stop.message.startswith(LOST)


def _without_ckpt_path(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith("--ckpt_path="):
            out.append(arg)
    return out


def _hpc_number(path: Path) -> int:
    number = path.stem.rpartition("_")[2]
    return int(number) if number.isdigit() else -1


def _first_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:300] or type(error).__name__


def _forget_wakeup() -> None:
    """In a forked child (a DataLoader worker): its signals are not this process's."""
    with contextlib.suppress(ValueError, OSError):
        signal.set_wakeup_fd(-1)
