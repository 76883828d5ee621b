"""Never hung, never silently wrong, never a false success (margins.guard and its use by every margin command).

Each case reproduces a way a cluster run goes wrong: a signal to one rank only, a rank killed, a user's error or a
full disk on some rank, a folder whose manifest was deleted, a second run into the same folder, leftovers of a
killed writer, bad values. Multi-process cases run 2 CPU processes (gloo) and carry a timeout, so a hang fails the
test instead of hanging it. Reference: an uninterrupted run of the same command.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import evaluate_margin
from common.errors import InputError
from margins import read_report
from margins.chunks import ChunkStore
from margins.evaluate import evaluate_margins
from margins.guard import EXIT_PEER_LOST, EXIT_SIGTERM, EXIT_SIGUSR1, RESUME, FolderLock
from margins.inputs import ModelSource
from margins.work import AttackSettings, RunSettings
from models import build_model
from tests.conftest import REPO, write_idx_mnist

ARRAYS = [f"{n}.npy" for n in ("margins", "converged", "iterations", "perturbed_labels", "indices", "targets")]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("nohang")
    write_idx_mnist(root / "data", num_test=96)
    torch.manual_seed(0)
    torch.save(build_model("lenet").state_dict(), root / "lenet.t7")
    return SimpleNamespace(root=root, data=root / "data", ckpt=root / "lenet.t7")


def _argv(s: SimpleNamespace, out: Path, samples: int = 64, chunk: int = 16) -> list[str]:
    """64 samples x 21 subspaces in chunks of 16: 84 chunks, several seconds on 2 processes."""
    return [
        "--model", "lenet", "--dataset", "mnist", "--checkpoint", str(s.ckpt), "--data-dir", str(s.data),
        "--num-samples", str(samples), "--chunk-rows", str(chunk), "--accelerator", "cpu", "--no-progress",
        "--output-dir", str(out),
    ]  # fmt: skip


def _start(argv: list[str], devices: int = 2, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, str(REPO / "evaluate_margin.py"), *argv, "--devices", str(devices)]
    return subprocess.Popen(cmd, cwd=REPO, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(argv: list[str], devices: int = 1) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "evaluate_margin.py"), *argv, "--devices", str(devices)]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


def _wait_for_chunks(out: Path, proc: subprocess.Popen, count: int = 3) -> None:
    deadline = time.time() + 120
    while len(list((out / "chunks").glob("chunk-*.npz"))) < count and proc.poll() is None:
        assert time.time() < deadline, "no chunk committed within 120 s"
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before the signal: {proc.communicate()}"


def _child(proc: subprocess.Popen) -> int:
    """The pid of the second rank (Lightning starts it as a child of the main process)."""
    deadline = time.time() + 60
    while time.time() < deadline:
        found = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        if found:
            return int(found[0])
        time.sleep(0.1)
    raise AssertionError("the second rank never started")


def _alive(out: Path) -> list[str]:
    """Processes still running a command into `out`."""
    return subprocess.run(["pgrep", "-f", f"--output-dir {out}"], capture_output=True, text=True).stdout.split()


@pytest.fixture(scope="module")
def reference(setup) -> Path:
    out = setup.root / "reference"
    done = _run(_argv(setup, out))
    assert done.returncode == 0, done.stderr
    return out


def _same_results(a: Path, b: Path) -> None:
    for name in ARRAYS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


# ---- 1. no hang: a signal or a kill on one rank ends every process, with a line naming the rank and the cause -----
@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "target, sig, code",
    [("child", signal.SIGTERM, EXIT_SIGTERM), ("main", signal.SIGTERM, EXIT_SIGTERM),
     ("child", signal.SIGUSR1, EXIT_SIGUSR1), ("child", signal.SIGKILL, EXIT_PEER_LOST)],
)  # fmt: skip
def test_a_signal_to_one_rank_ends_every_process_and_a_rerun_resumes(setup, reference, target, sig, code):
    out = setup.root / f"signal_{target}_{sig.name}"
    proc = _start(_argv(setup, out))
    child = _child(proc)
    _wait_for_chunks(out, proc)
    os.kill(child if target == "child" else proc.pid, sig)
    start = time.time()
    _, err = proc.communicate(timeout=60)  # before the fix: both ranks blocked in a futex, for ever
    assert proc.returncode == code and time.time() - start < 15
    rank = 1 if target == "child" else 0
    cause = "was killed by SIGKILL" if sig == signal.SIGKILL else f"received {sig.name}"
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"stopped: rank {rank}") and cause in last and last.endswith(RESUME)
    time.sleep(2)
    assert not _alive(out), "a process of the run is still alive"
    assert not (out / "summary.json").exists()  # no false success: the results are not written
    if sig == signal.SIGTERM and target == "child":  # the same command resumes to the uninterrupted result
        done = _run(_argv(setup, out), devices=2)
        assert done.returncode == 0, done.stderr
        _same_results(out, reference)


# ---- the watchdog between two processes, directly: a stop written by another rank, a dead child, a silent peer -----
WATCHED = """
import subprocess, sys, time
from pathlib import Path
from margins import guard
guard.PEER_TIMEOUT, guard.HEARTBEAT = 3.0, 0.5
folder, mode = Path(sys.argv[1]), sys.argv[2]
if mode == "child-error":  # rank 1: an input error, handed to rank 0 through the stop file
    with guard.Watchdog(folder, 1, 2) as dog:
        dog.write_stop(guard.EXIT_BAD_INPUT, "error: --data-dir /x is missing on rank 1's node")
        time.sleep(2)
    sys.exit(2)
if mode == "child-silent":  # rank 1: starts, then stops its heartbeat without a word (a frozen node)
    with guard.Watchdog(folder, 1, 2) as dog:
        dog._finished.set()
        time.sleep(6)
    sys.exit(0)
children = []
if mode in ("exit2", "kill"):
    code = "import sys, time; time.sleep(1); sys.exit(2)" if mode == "exit2" else "import time; time.sleep(30)"
    children = [subprocess.Popen([sys.executable, "-c", code])]
    guard.watch_children(children)
with guard.Watchdog(folder, 0, 2):
    if mode == "kill":
        time.sleep(1)
        children[0].kill()
    time.sleep(40)
print("not stopped")
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "mode, code, line",
    [("child-error", 2, "error: --data-dir /x is missing on rank 1's node"),
     ("exit2", 2, "error: rank 1 (process"), ("kill", EXIT_PEER_LOST, "was killed by SIGKILL"),
     ("child-silent", EXIT_PEER_LOST, "rank 1 stopped answering (no heartbeat for 3 s")],
)  # fmt: skip
def test_the_main_process_ends_with_the_cause_found_on_another_rank(tmp_path, mode, code, line):
    script = tmp_path / "watched.py"
    script.write_text(textwrap.dedent(WATCHED))
    folder, env = tmp_path / "chunks", {**ENV, "MARGINS_RUN_ID": "one-launch"}  # what torchrun's ranks share
    main = subprocess.Popen([sys.executable, str(script), str(folder), mode if "child" not in mode else "main"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    if "child" in mode:
        time.sleep(1.5)  # rank 0 is watching
        subprocess.run([sys.executable, str(script), str(folder), mode], cwd=REPO, env=env, timeout=60)
    out, err = main.communicate(timeout=60)
    assert main.returncode == code, (out, err)
    assert line in err and "not stopped" not in out
    assert len(err.strip().splitlines()) == 1  # one line from the main process


# ---- 2. never silently wrong: chunks of another run are recomputed, never merged ------------------------------
def test_a_folder_whose_manifest_was_deleted_never_merges_another_runs_chunks(setup, capsys):
    out = setup.root / "no_manifest"
    assert _in_process([*_argv(setup, out, samples=16), "--seed", "0"], capsys)[0] == 0
    (out / "summary.json").unlink()  # an interrupted seed-0 run: chunks, no results
    (out / "chunks" / "manifest.json").unlink()
    code, err = _in_process([*_argv(setup, out, samples=16), "--seed", "1"], capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "written by another run" in warnings[0]  # one line for all of them
    fresh = setup.root / "seed1"
    assert _in_process([*_argv(setup, fresh, samples=16), "--seed", "1"], capsys)[0] == 0
    _same_results(out, fresh)  # the seed-1 results, not the seed-0 chunks
    report = read_report(out)
    labels = np.frombuffer((setup.data / "MNIST/raw/t10k-labels-idx1-ubyte").read_bytes(), np.uint8, offset=8)
    assert (report.targets == labels[report.indices]).all()


def _in_process(argv: list[str], capsys) -> tuple[int, str]:
    """evaluate_margin.py's main in this process (for errors found before any work): exit status and stderr."""
    code = evaluate_margin.main([*argv, "--devices", "1"])
    return code, capsys.readouterr().err


def test_a_manifest_that_is_not_one_is_one_line_and_exit_2(setup, capsys):
    out = setup.root / "bad_manifest"
    (out / "chunks").mkdir(parents=True)
    (out / "chunks" / "manifest.json").write_text("[]")
    code, err = _in_process(_argv(setup, out, samples=4), capsys)
    assert code == 2 and err.strip().startswith("error:") and "manifest" in err
    assert len(err.strip().splitlines()) == 1


# ---- 3. never a false success: SIGTERM to a single process exits non-zero, with no result files -------------------
@pytest.mark.timeout(180)
def test_sigterm_to_a_single_process_is_not_a_success(setup, reference):
    out = setup.root / "single_sigterm"
    proc = _start(_argv(setup, out), devices=1)
    _wait_for_chunks(out, proc, count=2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_SIGTERM and "received SIGTERM" in err and RESUME in err
    assert not (out / "summary.json").exists()
    resumed = _run(_argv(setup, out))
    assert resumed.returncode == 0, resumed.stderr
    _same_results(out, reference)


# ---- 5. user errors and a full disk: one line, exit 2, nothing written ------------------------------------------
@pytest.mark.parametrize(
    "flags, words",
    [(["--seed", "-1"], "seed"), (["--num-workers", "-1"], "--num-workers"), (["--threads", "0"], "--threads"),
     (["--chunk-rows", "0"], "chunk_rows"), (["--max-iter", "0"], "max_iter")],
)  # fmt: skip
def test_bad_values_are_one_line_and_write_nothing(setup, flags, words, capsys):
    out = setup.root / f"bad_{flags[0].strip('-')}"
    code, err = _in_process([*_argv(setup, out, samples=4), *flags], capsys)
    assert code == 2 and err.startswith("error:") and words in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_a_directory_as_checkpoint_says_it_is_a_directory(setup, tmp_path, capsys):
    argv = _argv(setup, tmp_path / "out", samples=4)
    argv[argv.index("--checkpoint") + 1] = str(setup.root)
    code, err = _in_process(argv, capsys)
    assert code == 2 and "is a directory" in err and "lenet.t7" in err


def test_a_full_disk_is_one_line_naming_the_folder_and_a_rerun_resumes(setup, tmp_path, monkeypatch):
    source = ModelSource(setup.ckpt, "lenet", "mnist", data_dir=str(setup.data))
    settings = {"num_samples": 8, "subspace_step": 4, "output_dir": tmp_path / "full"}
    attack, run = AttackSettings(chunk_rows=8, max_iter=5), RunSettings(accelerator="cpu", progress=False)
    commit, calls = ChunkStore.commit, []

    def fills_up(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return commit(self, *args, **kwargs)

    monkeypatch.setattr(ChunkStore, "commit", fills_up)
    with pytest.raises(InputError, match=r"no space left on the disk holding .*full.* needs about .*resume"):
        evaluate_margins(source, attack=attack, run=run, **settings)
    assert len(list((tmp_path / "full" / "chunks").glob("chunk-*.npz"))) == 2  # committed chunks are kept
    monkeypatch.setattr(ChunkStore, "commit", commit)
    report, _ = evaluate_margins(source, attack=attack, run=run, **settings)
    fresh, _ = evaluate_margins(source, attack=attack, run=run, **{**settings, "output_dir": tmp_path / "fresh"})
    np.testing.assert_array_equal(report.margins, fresh.margins)


def test_train_py_bad_margin_settings_and_typos_are_one_line_and_leave_no_version_folder(tmp_path):
    def base(config: str) -> list[str]:
        return [sys.executable, str(REPO / "train.py"), "fit", "--config", str(REPO / "configs" / f"{config}.yaml"),
                "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "1"]  # fmt: skip

    for command, words in (
        ([*base("synthetic_lenet"), "--margin.num_samples", "0"], "margin.num_samples must be >= 1"),
        ([*base("synthetic_lenet"), "--margin.num_sample", "7"], "did you mean --margin.num_samples"),
        ([*base("mnist_lenet"), "--data.data_dir", str(tmp_path / "none")], "MNIST not found"),
    ):
        done = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and words in done.stderr, done.stderr[-2000:]
        assert not list(tmp_path.rglob("version_*")), f"{command[-2:]}: an empty version folder was left"


# ---- 6. nothing left behind -------------------------------------------------------------------------------------
def test_a_rerun_removes_what_a_killed_merge_left_and_counts_the_whole_run(setup, tmp_path):
    out = tmp_path / "merged"
    assert _run(_argv(setup, out, samples=8)).returncode == 0
    (out / "summary.json").unlink()  # killed during the merge: a half-written set beside the folder
    stale = tmp_path / f".{out.name}.tmp-deadbeef"
    stale.mkdir()
    (stale / "margins.npy").write_bytes(b"\x93NUMPY")
    again = _run(_argv(setup, out, samples=8))
    assert again.returncode == 0 and not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    time_line = next(line for line in again.stdout.splitlines() if line.startswith("time:"))
    assert "in the engine over all runs" in time_line and float(time_line.split()[1]) > 0.0  # not "0.0 s"
    assert not [p.name for p in (out / "chunks").iterdir() if p.name.startswith(".")]  # no markers, no lock


@pytest.mark.timeout(180)
def test_sigusr1_under_slurm_stops_without_a_checkpoint_in_the_folder(setup):
    out = setup.root / "slurm"
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "margins", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
             "SLURM_NODEID": "0", "SLURM_JOB_ID": "4242", "SLURM_NNODES": "1"}  # fmt: skip
    proc = _start(_argv(setup, out), devices=1, env={**ENV, **slurm})
    _wait_for_chunks(out, proc, count=2)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_SIGUSR1 and "received SIGUSR1" in err
    assert not list(out.rglob("*.ckpt"))  # Lightning's HPC checkpoint is never saved there


# ---- 7. a lock: a second run waits for the first, and a stale lock never blocks --------------------------------
HOLDER = """
import sys, time
from pathlib import Path
from margins.guard import FolderLock
with FolderLock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


@pytest.mark.timeout(120)
def test_a_second_run_waits_for_the_folders_holder_and_a_stale_lock_never_blocks(setup, tmp_path):
    out = tmp_path / "locked"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), "4"], cwd=REPO, env=ENV,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    done = _run(_argv(setup, out, samples=4))
    holder.wait(timeout=30)
    assert done.returncode == 0 and f"waiting for process {holder.pid}" in done.stderr
    with pytest.raises(InputError, match=rf"in use by process {os.getpid()} .*choose another output folder"):
        with FolderLock(tmp_path / "busy"), FolderLock(tmp_path / "busy", wait=0.5):
            pass
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / ".lock").write_text('{"pid": 1, "host": "gone", "since": "yesterday", "command": "killed -9"}')
    start = time.time()
    with FolderLock(stale):
        assert time.time() - start < 1.0
