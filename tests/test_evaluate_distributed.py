"""evaluate_margin.py on Lightning's machinery (Trainer.predict, for one process as for many): 1 vs 2 processes,
kills and resumes, damaged chunks, bad input.

Data: a generated MNIST in the raw idx layout (tests.conftest.write_idx_mnist), read back independently with numpy.
Independent reference: the engine called directly (`SubspaceDeepFool.attack_rows`) on the same chunks of rows,
each chunk with only its own samples, as in tests/test_sharding.py; the CLI must give those exact bits.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import evaluate_margin
from attacks.deepfool import SubspaceDeepFool
from frequency import DCTBlockSubspaces
from margins import MarginReport, read_report
from margins.run.guard import RESUME
from margins.run.work import chunk_ranges, row_grid
from models import Normalize, NormalizedModel, build_model
from tests.conftest import REPO, write_idx_mnist

ARRAYS = ("margins", "converged", "iterations", "perturbed_labels", "indices", "predicted", "targets")
ARRAYS = tuple(f"{name}.npy" for name in ARRAYS)
STEP = 4  # DCT blocks 8x8 with step 4 on 28x28: 6 subspaces
NUM_SUBSPACES = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("dist")
    write_idx_mnist(root / "data")
    torch.manual_seed(0)
    state = build_model("lenet").state_dict()
    torch.save(state, root / "lenet.t7")
    return SimpleNamespace(root=root, data=root / "data", ckpt=root / "lenet.t7", state=state)


def _argv(s: SimpleNamespace, out: Path, samples: int = 6, chunk: int = 8, max_iter: int = 4) -> list[str]:
    return [
        "--model", "lenet", "--dataset", "mnist", "--checkpoint", str(s.ckpt), "--data-dir", str(s.data),
        "--num-samples", str(samples), "--max-iter", str(max_iter), "--chunk-rows", str(chunk),
        "--subspace-step", str(STEP), "--accelerator", "cpu", "--threads", "1", "--no-progress",
        "--output-dir", str(out),
    ]  # fmt: skip


def _cli(argv: list[str], devices: int = 1, threads: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "evaluate_margin.py"), *argv, "--devices", str(devices)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _test_images(data: Path, indices: np.ndarray) -> torch.Tensor:
    """Images [N, 1, 28, 28] in [0, 1] parsed from the idx file with numpy (independent of the datamodule)."""
    raw = (data / "MNIST" / "raw" / "t10k-images-idx3-ubyte").read_bytes()
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)
    return torch.from_numpy(images[indices].astype(np.float32) / np.float32(255.0)).unsqueeze(1)


def _reference(s: SimpleNamespace, indices: np.ndarray, chunk: int, max_iter: int = 4) -> dict[str, np.ndarray]:
    """The engine on each chunk alone: margins/iterations/converged as [S, N]."""
    net = build_model("lenet")
    net.load_state_dict(s.state)
    model = NormalizedModel(Normalize([0.1307], [0.3081], (1, 28, 28)), net).eval()
    x = _test_images(s.data, indices)
    family = DCTBlockSubspaces((1, 28, 28), 8, STEP)
    attack = SubspaceDeepFool(max_iter=max_iter, batch_size=chunk)
    n = len(indices)
    out = {k: np.zeros(n * NUM_SUBSPACES, t) for k, t in (("m", np.float32), ("i", np.int64), ("c", bool))}
    for rows in chunk_ranges(n * NUM_SUBSPACES, chunk):
        samples, subs = row_grid(n, NUM_SUBSPACES, rows)
        used = sorted(set(samples))
        local = torch.tensor([used.index(k) for k in samples])
        r = attack.attack_rows(model, x[used], family, local, torch.tensor(subs))
        out["m"][rows.start : rows.stop] = r.margins.numpy()
        out["i"][rows.start : rows.stop], out["c"][rows.start : rows.stop] = r.iterations.numpy(), r.converged.numpy()
    return {k: v.reshape(n, NUM_SUBSPACES).T for k, v in out.items()}


def _assert_same_files(a: Path, b: Path) -> None:
    for name in ARRAYS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _check_against_reference(s: SimpleNamespace, out: Path, chunk: int) -> MarginReport:
    result = read_report(out)
    ref = _reference(s, result.indices, chunk)
    assert result.margins.shape == (NUM_SUBSPACES, len(result.indices))
    np.testing.assert_array_equal(result.margins, ref["m"])  # same float bits
    np.testing.assert_array_equal(result.iterations, ref["i"])
    np.testing.assert_array_equal(result.converged, ref["c"])
    return result


@pytest.fixture(scope="module")
def single(setup) -> Path:
    out = setup.root / "single"
    proc = _cli(_argv(setup, out), threads=2)  # the run pins --threads 1: OMP_NUM_THREADS 2 must not change bits
    assert proc.returncode == 0, proc.stderr
    return out


def test_single_process_equals_the_engine_on_each_chunk(setup, single):
    result = _check_against_reference(setup, single, chunk=8)
    settings = result.settings
    assert settings["dtype"] == "float32" and settings["torch_version"] == torch.__version__
    assert settings["device_type"] == "cpu" and settings["device_name"] and settings["chunk_rows"] == 8
    precision = settings["precision"]  # what the arithmetic was: dtype, TF32, device, torch
    assert precision["dtype"] == "float32" and precision["tf32"] is None and precision["device"].startswith("cpu: ")
    assert precision["torch"] == torch.__version__ and precision["device"] == settings["device_name"]
    assert result.schema_version == 3 and settings["cpu_threads"] == 1  # pinned, whatever OMP_NUM_THREADS says
    assert settings["kernels"] == "auto" and "channels_last" not in settings


def test_lightning_cli_checkpoint_in_one_process_is_quiet(setup, tmp_path):
    """A Lightning checkpoint of this project (datamodule hparams as LightningCLI records them, flipped data),
    measured in one process through Trainer.predict: the datamodule is rebuilt from the recorded hparams and
    Lightning's device banners are not printed."""
    from datamodules import MNISTDataModule

    state = {f"model.net.{k}": v for k, v in setup.state.items()}
    data = dict(MNISTDataModule(str(setup.data), transform="flip").hparams)
    hparams = {"net": "lenet", "num_classes": 10, "image_shape": (1, 28, 28)}
    recorded = {"_class_path": "datamodules.MNISTDataModule", **data}  # as LightningCLI records them
    ckpt = tmp_path / "run.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": hparams, "datamodule_hyper_parameters": recorded}, ckpt)
    out = tmp_path / "out"
    argv = ["--checkpoint", str(ckpt), "--num-samples", "3", "--max-iter", "3", "--subspace-step", str(STEP),
            "--no-progress", "--output-dir", str(out)]  # fmt: skip
    proc = _cli(argv)
    assert proc.returncode == 0, proc.stderr
    assert "GPU available" not in proc.stderr and "TPU available" not in proc.stderr
    settings = read_report(out).settings
    assert settings["transform"] == "flip" and settings["data"] == json.loads(json.dumps(data))
    assert "lenet on mnist: 3 samples" in proc.stdout


def test_two_processes_equal_one_and_share_the_chunks(setup, single):
    out = setup.root / "two"
    proc = _cli(_argv(setup, out), devices=2)
    assert proc.returncode == 0, proc.stderr
    _assert_same_files(single, out)
    lines = [
        json.loads(x) for j in sorted((out / "chunks").glob("journal-rank*.jsonl")) for x in j.read_text().splitlines()
    ]
    chunks = [entry["chunk"] for entry in lines]
    assert sorted(chunks) == list(range(5))  # 36 rows in chunks of 8: each chunk once, no padding duplicates
    ranks = {j.name for j in (out / "chunks").glob("journal-rank*.jsonl")}
    assert ranks == {"journal-rank0.jsonl", "journal-rank1.jsonl"}  # both processes worked


@pytest.mark.parametrize("samples,chunk", [(1, 512), (1, 4), (3, 5)])
def test_few_samples_on_two_processes(setup, samples, chunk):
    """1 sample (one chunk for two ranks, or rows of one sample split over ranks), 3 samples with chunks
    crossing sample boundaries."""
    out = setup.root / f"few_{samples}_{chunk}"
    proc = _cli(_argv(setup, out, samples=samples, chunk=chunk), devices=2)
    assert proc.returncode == 0, proc.stderr
    _check_against_reference(setup, out, chunk)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGUSR1])
def test_killed_run_resumes_to_the_uninterrupted_result(setup, sig, tmp_path):
    """Kill the process once it committed a chunk (it then waits for the test: tests.test_no_hang's gate); the
    same command then finishes with the same bits. SIGUSR1 stops the run with its own exit code (138) and a line
    saying how to resume (SIGTERM, 143: tests/test_no_hang.py)."""
    from tests.test_no_hang import _start_gated, _wait_for_gate

    argv = _argv(setup, setup.root / f"killed_{sig.name}", samples=8, chunk=2, max_iter=30)
    proc, gate = _start_gated(argv, 1, tmp_path)
    chunks = setup.root / f"killed_{sig.name}" / "chunks"
    _wait_for_gate(gate, proc, 1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert not (chunks.parent / "summary.json").exists()
    assert proc.returncode == {signal.SIGKILL: -9, signal.SIGTERM: 143, signal.SIGUSR1: 138}[sig]
    if sig != signal.SIGKILL:
        line = f"stopped: rank 0 received {sig.name}; {RESUME}"
        assert err.strip().splitlines()[-1] == line
    committed_before = {p.name: p.read_bytes() for p in chunks.glob("chunk-*.npz")}
    assert committed_before
    resumed = _cli(argv)
    assert resumed.returncode == 0, resumed.stderr
    for name, data in committed_before.items():  # committed chunks were kept, not recomputed
        assert (chunks / name).read_bytes() == data
    assert len(list(chunks.glob("chunk-*.npz"))) == 24 and not list(chunks.glob(".*tmp*"))
    _check_against_reference_args(setup, chunks.parent, chunk=2, max_iter=30)


def _check_against_reference_args(s: SimpleNamespace, out: Path, chunk: int, max_iter: int) -> None:
    result = read_report(out)
    ref = _reference(s, result.indices, chunk, max_iter)
    np.testing.assert_array_equal(result.margins, ref["m"])
    np.testing.assert_array_equal(result.iterations, ref["i"])


def _unfinished_copy(src: Path, dst: Path) -> Path:
    """A copy of a finished folder without its summary: what a run killed before the merge leaves."""
    import shutil

    shutil.copytree(src, dst)
    (dst / "summary.json").unlink()
    return dst


def test_resume_refuses_other_settings_and_overwrite_restarts(setup, single, capsys):
    out = _unfinished_copy(single, setup.root / "other_settings")
    code = evaluate_margin.main([*_argv(setup, out, max_iter=5), "--devices", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "max_iter: 4 there, 5 now" in err[0]
    assert "--overwrite" in err[0] and len(list((out / "chunks").glob("chunk-*.npz"))) == 5  # nothing lost
    code = evaluate_margin.main([*_argv(setup, out, max_iter=5), "--devices", "1", "--overwrite"])
    assert code == 0
    assert read_report(out).settings["max_iter"] == 5


def test_finished_evaluation_is_not_overwritten(setup, single, capsys):
    before = (single / "summary.json").read_bytes()
    code = evaluate_margin.main([*_argv(setup, single), "--devices", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "already holds a finished evaluation" in err[0]
    assert str(single.resolve()) in err[0] and (single / "summary.json").read_bytes() == before


def test_corrupt_chunk_is_reported_and_recomputed(setup, single, capsys):
    out = _unfinished_copy(single, setup.root / "corrupt")
    victim = out / "chunks" / "chunk-000001.npz"
    victim.write_bytes(victim.read_bytes()[:-7] + b"garbage")
    others = {p.name: p.stat().st_mtime_ns for p in (out / "chunks").glob("chunk-*.npz") if p != victim}
    stale = setup.root / ".corrupt.tmp-0123abcd"  # a killed writer's leftover beside the folder
    stale.mkdir()
    code = evaluate_margin.main([*_argv(setup, out), "--devices", "1"])
    err = [line for line in capsys.readouterr().err.splitlines() if "chunk-000001" in line]
    assert code == 0 and len(err) == 1 and "corrupt" in err[0] and "recomputing" in err[0]
    assert {p: (out / "chunks" / p).stat().st_mtime_ns for p in others} == others  # other chunks untouched
    _assert_same_files(single, out)
    assert not stale.exists()


def test_bad_devices_and_unwritable_folder_are_one_line(setup, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cases = {
        "devices 0": (["--devices", "0"], tmp_path / "o1", "devices 0"),
        "devices text": (["--devices", "two"], tmp_path / "o2", "--devices 'two'"),
        "unwritable": (["--devices", "1"], blocker / "sub", "cannot write to the output folder"),
    }
    for name, (extra, out, pattern) in cases.items():
        code = evaluate_margin.main([*_argv(setup, out), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and pattern in err[0], (name, err)
        assert not out.exists()  # nothing written


def test_internal_bug_shows_a_traceback_and_exits_1(setup, tmp_path):
    code = (
        "import sys, attacks.deepfool as d\n"
        "def boom(*a, **k): raise ValueError('engine bug')\n"
        "d.SubspaceDeepFool.attack_rows = boom\n"
        "import evaluate_margin\n"
        f"sys.exit(evaluate_margin.main({_argv(setup, tmp_path / 'bug')!r}))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "ValueError: engine bug" in proc.stderr
    assert "error: engine bug" not in proc.stderr
