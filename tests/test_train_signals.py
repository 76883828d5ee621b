"""A fit ends the way an evaluation does (common.process): a signal to any rank, a lost rank or a failed margin
measurement ends every process of a 2-process DDP fit (gloo, CPU) within the stated bound, with one line naming the
rank, the cause and the command that resumes, and the exit status that says what happened; the last checkpoint
loads and `--ckpt_path` of it finishes the fit.

The moment is chosen by a test-only callback inside the fit (`SignalAt`): at that point the chosen ranks send the
signal to themselves, so nothing depends on timing; it notes when (a file per rank) for the seconds to stop.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from common.stop import RunStopped
from tests.conftest import REPO

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
BOUND = 60.0  # seconds from the signal to the end of every process (common.process.GRACE), on a loaded machine
FIT = [
    "fit", "--config", str(REPO / "configs" / "synthetic_lenet.yaml"),
    "--data.init_args.num_train", "64", "--data.init_args.num_test", "32", "--data.init_args.batch_size", "8",
    "--data.init_args.image_shape", "[1, 16, 16]", "--trainer.max_epochs", "3", "--trainer.enable_progress_bar",
    "false", "--trainer.enable_model_summary", "false", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
    "--trainer.strategy", "ddp", "--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "2",
    "--margin.rows.num_samples", "8", "--margin.attack.chunk_rows", "2", "--margin.every_n_epochs", "1",
    "--margin.measure_at_fit_end", "false", "--margin.log_figure", "false", "--margin.progress", "false",
]  # fmt: skip


class SignalAt(L.Callback):
    """Test only: at `moment` ("train": after training batch `batch`; "validation": after validation batch `batch`;
    "checkpoint": while the checkpoint is saved; "margin": once this rank committed its first margin chunk) of epoch
    `epoch`, each rank in `ranks` sends `signal` to itself, after noting the time in `<marks>/rank<r>`."""

    def __init__(self, marks: str, moment: str = "train", ranks: list[int] | None = None, signal: str = "SIGTERM",
                 epoch: int = 1, batch: int = 1):  # fmt: skip
        self.marks, self.moment, self.ranks = Path(marks), moment, ranks if ranks is not None else [0]
        self.signal, self.epoch, self.batch = signal, epoch, batch
        self.fired = False

    def fire(self, trainer: L.Trainer) -> None:
        if self.fired or trainer.global_rank not in self.ranks:
            return
        self.fired = True
        self.marks.mkdir(parents=True, exist_ok=True)
        (self.marks / f"rank{trainer.global_rank}").write_text(json.dumps({"time": time.time(), "pid": os.getpid()}))
        os.kill(os.getpid(), getattr(signal, self.signal))

    def _now(self, trainer: L.Trainer, moment: str, batch: int | None = None) -> bool:
        right_batch = batch is None or batch == self.batch
        return self.moment == moment and trainer.current_epoch == self.epoch and right_batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._now(trainer, "train", batch_idx):
            self.fire(trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking and self._now(trainer, "validation", batch_idx):
            self.fire(trainer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self._now(trainer, "checkpoint"):
            self.fire(trainer)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._now(trainer, "margin"):
            folder = Path(trainer.log_dir)  # a broadcast: on every rank
            if trainer.global_rank not in self.ranks:
                return
            journal = (
                folder / "margins" / f"epoch_{self.epoch:03d}" / "chunks" / f"journal-rank{trainer.global_rank}.jsonl"
            )
            threading.Thread(target=self._after_first_chunk, args=(trainer, journal), daemon=True).start()

    def _after_first_chunk(self, trainer: L.Trainer, journal: Path) -> None:
        while not (journal.is_file() and journal.read_text().strip()):
            time.sleep(0.01)
        self.fire(trainer)


def callback(marks: Path, **settings) -> list[str]:
    init = {"marks": str(marks), **settings}
    return ["--trainer.callbacks+", json.dumps({"class_path": "tests.test_train_signals.SignalAt", "init_args": init})]


def start(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env or ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def finish(proc: subprocess.Popen, marks: Path | None = None) -> SimpleNamespace:
    """Wait for the command: its exit status, stdout, stderr (lines, last line) and, from the first signal a rank
    noted in `marks`, the seconds until its `stopped:` line and until the command ended."""
    seen: dict[str, float] = {}

    def read(stream, chunks: list[str]) -> None:
        for line in stream:
            if line.startswith("stopped:"):
                seen.setdefault("line", time.time())
            chunks.append(line)

    out: list[str] = []
    err: list[str] = []
    readers = [threading.Thread(target=read, args=args) for args in ((proc.stdout, out), (proc.stderr, err))]
    for reader in readers:
        reader.start()
    proc.wait(timeout=600)
    end = time.time()
    for reader in readers:
        reader.join()
    signalled = min((json.loads(p.read_text())["time"] for p in marks.glob("rank*")), default=None) if marks else None
    lines = "".join(err).strip().splitlines()
    return SimpleNamespace(
        code=proc.returncode, out="".join(out), err="".join(err), lines=lines, last=lines[-1] if lines else "",
        seconds=end - signalled if signalled else float("nan"),
        to_line=seen["line"] - signalled if signalled and "line" in seen else float("nan"),
    )  # fmt: skip


def finish_all(procs: list[subprocess.Popen], marks: Path | None = None) -> list[SimpleNamespace]:
    """`finish` of several commands at once (each one's output read while the others run)."""
    with ThreadPoolExecutor(len(procs)) as pool:
        return list(pool.map(lambda proc: finish(proc, marks), procs))


def alive(pattern: str) -> list[str]:
    return subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()


def checkpoint_in(runs: Path) -> Path:
    (path,) = runs.glob("*/version_0/checkpoints/last.ckpt")
    return path


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def row(*cells: object) -> None:
    """A row of the table of outcomes (shown with `pytest -s`)."""
    print("\n| " + " | ".join(str(c) for c in cells) + " |")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The last checkpoint of the same fit, uninterrupted."""
    root = tmp_path_factory.mktemp("reference")
    done = finish(start([*FIT, "--trainer.default_root_dir", str(root / "runs")], root))
    assert done.code == 0, done.err[-3000:]
    return checkpoint_in(root / "runs")


CASES = [  # signal, moment, ranks, exit status, the cause in the line, global step of last.ckpt, resumed
    ("SIGTERM", "train", [0], 143, "rank 0 received SIGTERM", 4, True),
    ("SIGTERM", "validation", [1], 143, "rank 1 received SIGTERM", 4, False),
    ("SIGTERM", "margin", [1], 143, "rank 1 received SIGTERM", 4, False),  # last.ckpt as in the first case
    ("SIGTERM", "margin", [0, 1], 143, "rank [01] received SIGTERM", 4, False),  # the first to stop is named
    ("SIGTERM", "checkpoint", [0], 143, "rank 0 received SIGTERM", 8, True),  # the save completes, then the stop
    ("SIGUSR1", "train", [1], 138, "rank 1 received SIGUSR1", 4, False),  # outside SLURM: as SIGTERM
    ("SIGINT", "validation", [0, 1], 130, "rank 0 received SIGINT", 4, False),  # Ctrl-C: every process of the group
    ("SIGKILL", "train", [1], 3, r"rank 1 \(process {pid}\) was killed by SIGKILL", 4, False),
    ("SIGKILL", "margin", [1], 3, r"rank 1 \(process {pid}\) was killed by SIGKILL", 4, False),
]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("sig, moment, ranks, code, cause, step, resumed", CASES)
def test_a_signal_or_a_lost_rank_ends_every_process_with_one_line_and_the_fit_resumes(
    tmp_path, reference, sig, moment, ranks, code, cause, step, resumed
):
    runs, marks = tmp_path / "runs", tmp_path / "marks"
    args = [*FIT, "--trainer.default_root_dir", str(runs)]
    done = finish(start([*args, *callback(marks, moment=moment, ranks=ranks, signal=sig)], tmp_path), marks)
    assert done.code == code, done.err[-3000:]
    pid = next(json.loads(p.read_text())["pid"] for p in sorted(marks.glob("rank*")))
    assert "Traceback" not in done.err and [line for line in done.lines if line.startswith("stopped:")] == [done.last]
    checkpoint = checkpoint_in(runs)
    assert re.match(f"stopped: {cause.format(pid=pid)}; resume with: python {REPO / 'train.py'} fit ", done.last)
    assert done.last.endswith(f" --ckpt_path {checkpoint}") and "SignalAt" in done.last  # the command as it was
    assert done.seconds < BOUND and not alive(str(runs)), "a process of the fit outlived the bound"
    assert torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"] == step  # whole, loads
    outcome = "not resumed here"
    if resumed:
        again = finish(start([*args, "--ckpt_path", str(checkpoint)], tmp_path))
        assert again.code == 0, again.err[-3000:]
        final = weights(next(runs.glob("*/version_1/checkpoints/last.ckpt")))
        expected = weights(reference)
        assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)
        outcome = "exit 0, weights equal to the uninterrupted fit's"
    timing = f"line {done.to_line:.1f} s, ended {done.seconds:.1f} s"
    row(sig, moment, ",".join(map(str, ranks)), done.code, timing, done.last.split("; resume")[0], outcome)


class FailMeasurement(L.Callback):
    """Test only: on rank `rank`, the margin measurement of epoch `epoch` fails (its chunk attack raises)."""

    def __init__(self, rank: int = 1, epoch: int = 1):
        self.rank, self.epoch = rank, epoch

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from margins.run.work import ChunkWork

        attack = ChunkWork.attack

        def failing(work, batch, device):
            if trainer.global_rank == self.rank and trainer.current_epoch == self.epoch:
                raise ValueError("injected failure")
            return attack(work, batch, device)

        ChunkWork.attack = failing


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_a_failed_measurement_on_one_rank_raises_through_lightning_or_is_skipped(tmp_path, on_error):
    runs = tmp_path / "runs"
    fail = json.dumps({"class_path": "tests.test_train_signals.FailMeasurement", "init_args": {"rank": 1}})
    args = [*FIT, "--trainer.default_root_dir", str(runs), "--trainer.callbacks+", fail, "--margin.on_error", on_error]
    done = finish(start(args, tmp_path))
    margins = next(runs.glob("*/version_0/margins"))
    if on_error == "raise":  # rank 1's traceback (a bug), rank 0's line; the last checkpoint loads and resumes
        assert done.code == 1 and done.err.count("Traceback") == 1 and "ValueError: injected failure" in done.err
        checkpoint = checkpoint_in(runs)
        assert re.match(
            r"stopped: rank 1 failed: ValueError: injected failure; resume with: .* --ckpt_path ", done.last
        )
        assert done.last.endswith(str(checkpoint)) and not (margins / "epoch_001" / "summary.json").exists()
        assert torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"] == 4
        assert not alive(str(runs))
    else:  # one warning line; every other measurement and the fit finish
        warnings = [line for line in done.lines if line.startswith("warning: margins")]
        assert done.code == 0 and "Traceback" not in done.err, done.err[-3000:]
        assert warnings == ["warning: margins epoch 1 skipped (rank 1 failed: ValueError: injected failure); training "
                            "goes on (margin.on_error: skip)"]  # fmt: skip
        assert [(margins / f"epoch_{e:03d}" / "summary.json").exists() for e in range(3)] == [True, False, True]
        assert torch.load(checkpoint_in(runs), map_location="cpu", weights_only=True)["global_step"] == 12
    row(
        "(measurement fails)",
        "margin",
        1,
        done.code,
        "",
        (done.last if on_error == "raise" else warnings[0])[:60],
        on_error,
    )


def slurm_task(rank: int, args: list[str], cwd: Path, bin_dir: Path, port: int) -> subprocess.Popen:
    """One task of a 2-task SLURM job step on this machine, as srun starts it."""
    env = {**ENV, "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
           "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
           "SLURM_NODELIST": "127.0.0.1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    return start(args, cwd, env)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("moment", ["train", "margin"])
def test_sigusr1_under_slurm_saves_a_checkpoint_requeues_and_the_requeued_job_resumes(tmp_path, reference, moment):
    """At a training step, Lightning's requeue (its HPC checkpoint, mid-epoch); inside a margin measurement (no
    point where every rank meets), rank 0 hands the last checkpoint to Lightning as its HPC checkpoint."""
    runs, marks, bin_dir, calls = tmp_path / "runs", tmp_path / "marks", tmp_path / "bin", tmp_path / "scontrol.calls"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')  # SLURM's scontrol, recording its calls
    (bin_dir / "scontrol").chmod(0o755)
    args = [*FIT, "--trainer.default_root_dir", str(runs)]
    signalled = [*args, *callback(marks, moment=moment, ranks=[1], signal="SIGUSR1")]
    port = free_port()
    done = finish_all([slurm_task(rank, signalled, tmp_path, bin_dir, port) for rank in (0, 1)], marks)
    assert [d.code for d in done] == [138, 138], done[0].err[-3000:]
    assert calls.read_text().split() == ["requeue", "4242"]  # rank 0 only, once
    (hpc,) = runs.glob("hpc_ckpt_*.ckpt")  # where Lightning resumes a requeued job from
    if moment == "train":
        saved = f"Lightning saved {hpc} and requeued"
    else:
        saved = f"{checkpoint_in(runs)} copied to {hpc} and requeued"
    assert done[0].last == f"stopped: rank 1 received SIGUSR1; {saved} SLURM job 4242, which resumes from it"
    assert "Traceback" not in done[0].err + done[1].err and not [x for x in done[1].lines if "stopped" in x]
    assert torch.load(hpc, map_location="cpu", weights_only=True)["global_step"] == (6 if moment == "train" else 4)
    port = free_port()
    again = finish_all([slurm_task(rank, args, tmp_path, bin_dir, port) for rank in (0, 1)])
    assert [a.code for a in again] == [0, 0], again[0].err[-3000:]
    assert f"Restoring states from the checkpoint path at {hpc}" in again[0].out + again[0].err
    final, expected = weights(next(runs.glob("*/version_1/checkpoints/last.ckpt"))), weights(reference)
    equal = all(torch.equal(final[k], expected[k]) for k in expected)
    assert equal == (moment == "margin")  # a mid-epoch checkpoint restarts the epoch's data: not the same weights
    timing = f"line {done[0].to_line:.1f} s, ended {max(d.seconds for d in done):.1f} s"
    outcome = f"requeued job: exit 0, weights {'equal to' if equal else 'differ from'} the uninterrupted fit's"
    row("SIGUSR1 (SLURM)", moment, 1, 138, timing, done[0].last, outcome)


# ---- the control itself, in one process: a main thread stuck in a C call, a stop before the trainer runs --------
STUCK = """
import contextlib, datetime, sys
import torch.distributed as dist
from common.process import TrainingControl
from common.stop import CommandExit, stop_signals
store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), 2, True, datetime.timedelta(seconds=120), wait_for_workers=False)
with CommandExit(grace=float(sys.argv[2])) as command, TrainingControl(["fit", "--config", "x.yaml"]) as control:
    # armed (as TrainingControl.arm does): a trainer runs, a stop waits for the ranks' next meeting point
    with stop_signals(control._reaction, defer=True) if sys.argv[3] == "armed" else contextlib.nullcontext():
        try:
            print("ready", flush=True)
            store.wait(["never"])  # blocked in C++, as in a collective waiting for a rank that is gone
        except BaseException as err:
            stop = control.outcome(err)
            sys.exit(command.stopped(stop) if stop else 1)
print("not stopped", flush=True)
"""


@pytest.mark.timeout(180)
@pytest.mark.parametrize("state", ["armed", "idle"])
def test_a_stop_ends_a_main_thread_stuck_in_a_c_call_within_the_grace_period(tmp_path, state):
    """The signal's handler cannot run while the main thread is in C++: the control's thread reads the signal from
    the wakeup fd and the command's last resort ends the process after its grace period, with the line and 143
    (idle, no trainer: the handler raises the stop at once if the signal lands before the C call)."""
    proc = subprocess.Popen([sys.executable, "-c", STUCK, str(free_port()), "3", state], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "ready"
    start_time = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    seconds = time.time() - start_time
    assert proc.returncode == 143 and "not stopped" not in out, err
    (line,) = err.strip().splitlines()
    assert line.startswith("stopped: rank 0 received SIGTERM; no checkpoint was saved yet; start again: ")
    assert line.endswith(" fit --config x.yaml")
    assert seconds < 60.0 and (state == "idle" or seconds >= 3.0)  # armed: the last resort, after its grace period
    row("SIGTERM", f"main thread in a C call ({state})", 0, proc.returncode, f"{seconds:.1f} s", err.strip()[:60], "")


def test_a_stop_file_counts_only_with_this_runs_id(tmp_path, monkeypatch):
    """A measurement's watchdog stops for a stop file of this run only: not another run's, not one without a run id
    (a file copied in, an older version's); an empty one (a full disk) counts when written since it started."""
    from margins.run.guard import STOP_FILE, Watchdog

    monkeypatch.setenv("MARGINS_RUN_ID", "this-run")
    stop = tmp_path / STOP_FILE
    old = {"code": 143, "message": "rank 1 received SIGTERM", "rank": 1}
    stop.write_text("")
    os.utime(stop, (1.0, 1.0))  # an empty stop file of long ago
    dog = Watchdog(tmp_path, rank=0, world_size=2)
    (tmp_path / ".alive-rank1").touch()  # rank 1 is alive (else, in a process older than the start timeout: lost)
    dog.check()
    for record in (old, {**old, "run": "another-run"}):
        stop.write_text(json.dumps(record))
        dog.check()  # not this run's: no stop
    stop.write_text(json.dumps({**old, "run": "this-run"}))
    with pytest.raises(RunStopped) as raised:
        dog.check()
    assert (raised.value.code, raised.value.message) == (143, "rank 1 received SIGTERM")
    stop.write_text("")  # a full disk during this run: written after this process started
    with pytest.raises(RunStopped):
        dog.check()


class _Child:
    """A rank the main process started, as `subprocess.Popen` shows it: still running for `running` polls, then
    ended with `code` (None: never ends)."""

    def __init__(self, pid: int, code: int | None, running: int = 0):
        self.pid, self.code, self.running = pid, code, running

    def poll(self) -> int | None:
        if self.running > 0:
            self.running -= 1
            return None
        return self.code

    def wait(self, timeout: float | None = None) -> int | None:
        return self.code

    def kill(self) -> None:
        self.code = -9


@pytest.mark.parametrize(
    "children, cause",
    [
        ([(-9, 3)], "rank 1 (process 101) was killed by SIGKILL"),  # seen ended only after the collective failed
        ([(3, 0), (-9, 2)], "rank 2 (process 102) was killed by SIGKILL"),  # rank 1 ended first, a victim only
        ([(None, 0)], "a process of the run was lost (a collective failed: "),  # lost on another node
    ],
)
def test_a_failed_collective_names_the_rank_that_was_killed_even_when_it_is_seen_ended_later(
    monkeypatch, children, cause
):
    """The main process's collective fails when a rank it started is killed; the killed rank's sockets close before
    its status can be collected, so the main process waits (bounded) for it and names it, not a rank that ended
    only because it lost a peer too; with every rank here running (a loss on another node) the wait runs out."""
    import common.process as process

    monkeypatch.setattr(process, "LOST_CHILD_WAIT", 0.5)
    monkeypatch.setattr(process, "CHILDREN_WAIT", 0.0)
    control = process.TrainingControl(["fit", "--config", "x.yaml"])
    control.world_size = 2
    control.children = [_Child(101 + i, code, running) for i, (code, running) in enumerate(children)]
    stop = control.outcome(RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection reset by peer"))
    assert stop is not None and stop.code == process.EXIT_PEER_LOST
    assert stop.message.startswith(cause), stop.message
