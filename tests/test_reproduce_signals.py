"""scripts/reproduce.py while it trains: the child train.py's epoch lines reach the terminal, and SIGTERM or SIGINT
to reproduce.py ends that child and prints one line saying how to resume. Handshake: the test signals once the
first epoch line has arrived (the child is training), never after a sleep."""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import reproduce

REPO = Path(__file__).resolve().parents[1]


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended while listed
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from Linux /proc")
@pytest.mark.timeout(900)
def test_sigterm_ends_the_training_child_and_says_how_to_resume(tmp_path, tiny_mnist_root):
    stop = signal.SIGTERM  # SIGINT takes the same path (test_both_signals_interrupt_and_handlers_come_back)
    train = "--trainer.limit_val_batches 1 --trainer.num_sanity_val_steps 0 --data.batch_size 16"
    argv = ["--dataset", "mnist", "--data-dir", str(tiny_mnist_root), "--out", str(tmp_path), "--only", "mnist_lenet",
            "--epochs", "100000", "--num-samples", "2", "--robust-samples", "0", f"--train-args={train}"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "scripts/reproduce.py", *argv], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        said = []
        for line in proc.stdout:  # the handshake: train.py's first epoch line, relayed by reproduce.py
            said.append(line)
            if "mnist_lenet: epoch 1/100000 done: train loss " in line:
                break
        else:
            pytest.fail(f"no epoch line before reproduce.py ended: {''.join(said)}{proc.stderr.read()}")
        (child,) = children(proc.pid)
        assert running(child)
        proc.send_signal(stop)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + stop, err
    assert not running(child), "train.py outlived reproduce.py"
    (resume,) = [line for line in err.splitlines() if "resume with:" in line]
    assert resume.startswith(f"stopped by {stop.name}:")
    assert resume.endswith(f"resume with: python scripts/reproduce.py {shlex.join(argv)}")
    assert "training (log: " in said[0] and "Traceback" not in err


def test_both_signals_interrupt_and_handlers_come_back():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for stop in before:
        with pytest.raises(reproduce.Interrupted) as caught:
            with reproduce.interruptible():
                signal.raise_signal(stop)
        assert caught.value.signum == stop and str(caught.value) == stop.name
        assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.timeout(120)
def test_a_child_that_ignores_sigterm_is_killed(monkeypatch):
    monkeypatch.setattr(reproduce, "STOP_WAIT_S", 0.1)
    stubborn = "\n".join(["import signal", "signal.signal(signal.SIGTERM, signal.SIG_IGN)",
                           "print('ready', flush=True)", "while True: signal.pause()"])  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", stubborn], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"  # the handshake: SIGTERM is ignored from here on
        reproduce.end_child(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
