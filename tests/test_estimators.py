"""A second margin estimator everywhere an estimator is chosen: FMN through the same rows, chunks, processes, resume
and result folders as DeepFool; the comparison of two estimators row by row (compare_margins.py).

References: the FMN engine called directly on each chunk (tests/test_fmn.py checks FMN itself against exact linear
margins); an uninterrupted single-process run; hand-made result folders whose ratios are known.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import compare_margins
from common.errors import InputError
from margins import MarginReport, read_report, write_report
from margins.inputs import ModelSource
from margins.run.evaluate import evaluate_margins
from margins.settings import AttackSettings, RowSettings, RunSettings
from models import build_model
from tests.conftest import REPO, write_idx_mnist

ARRAYS = [f"{n}.npy" for n in ("margins", "converged", "iterations", "perturbed_labels", "indices", "targets")]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("estimators")
    write_idx_mnist(root / "data")
    torch.manual_seed(0)
    torch.save(build_model("lenet").state_dict(), root / "lenet.t7")
    return SimpleNamespace(root=root, data=root / "data", ckpt=root / "lenet.t7")


def _argv(s: SimpleNamespace, out: Path, estimator: str = "fmn") -> list[str]:
    """6 samples x 6 subspaces (8x8 blocks, step 4) in chunks of 8 rows: 5 chunks."""
    return [
        "--model", "lenet", "--dataset", "mnist", "--checkpoint", str(s.ckpt), "--data-dir", str(s.data),
        "--num-samples", "6", "--subspace-step", "4", "--chunk-rows", "8", "--estimator", estimator,
        "--fmn-steps", "20", "--accelerator", "cpu", "--threads", "1", "--no-progress", "--output-dir", str(out),
    ]  # fmt: skip


def _run(argv: list[str], devices: int = 1) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "evaluate_margin.py"), *argv, "--devices", str(devices)]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def fmn_single(setup) -> Path:
    out = setup.root / "fmn_single"
    done = _run(_argv(setup, out))
    assert done.returncode == 0, done.stderr
    return out


def test_fmn_runs_through_the_chunks_and_records_its_settings(setup, fmn_single):
    report = read_report(fmn_single)
    assert report.settings["estimator"] == "fmn"
    assert report.settings["estimator_settings"] == {
        "estimator": "fmn", "version": 1, "steps": 20, "gamma": 0.05, "step_ratio": 1.0, "search_steps": 30,
        "num_candidates": 10,
    }  # fmt: skip
    assert report.margins.shape == (6, 6) and report.converged.all()
    assert (report.iterations >= 1).all() and (report.iterations <= 20).all()
    deepfool = _run(_argv(setup, setup.root / "deepfool", "deepfool"))
    assert deepfool.returncode == 0, deepfool.stderr
    exact = read_report(setup.root / "deepfool")
    assert exact.settings["estimator_settings"]["estimator"] == "deepfool"
    assert np.median(report.margins / exact.margins) <= 1.0  # a minimum-norm attack finds margins no larger


@pytest.mark.slow
def test_fmn_on_two_processes_equals_one_bit_for_bit(setup, fmn_single):
    out = setup.root / "fmn_two"
    done = _run(_argv(setup, out), devices=2)
    assert done.returncode == 0, done.stderr
    for name in ARRAYS:
        assert (out / name).read_bytes() == (fmn_single / name).read_bytes(), name


@pytest.mark.timeout(240)
def test_a_killed_fmn_run_resumes_to_the_same_files(setup, fmn_single):
    out = setup.root / "fmn_killed"
    cmd = [sys.executable, str(REPO / "evaluate_margin.py"), *_argv(setup, out), "--devices", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list((out / "chunks").glob("chunk-*.npz")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (out / "summary.json").exists(), "killed too late: the run had finished"
    done = _run(_argv(setup, out))
    assert done.returncode == 0, done.stderr
    for name in ARRAYS:
        assert (out / name).read_bytes() == (fmn_single / name).read_bytes(), name


def test_a_resume_with_the_other_estimator_is_refused(setup, fmn_single, tmp_path):
    source = ModelSource(setup.ckpt, "lenet", "mnist", data_dir=str(setup.data))
    folder = tmp_path / "mixed"
    run = RunSettings(accelerator="cpu", progress=False)
    evaluate_margins(
        source,
        rows=RowSettings(num_samples=3, subspace_step=4),
        output_dir=folder,
        run=run,
        attack=AttackSettings(chunk_rows=8, estimator="fmn", fmn_steps=5),
    )
    (folder / "summary.json").unlink()
    with pytest.raises(InputError, match="estimator"):
        evaluate_margins(
            source,
            rows=RowSettings(num_samples=3, subspace_step=4),
            output_dir=folder,
            run=run,
            attack=AttackSettings(chunk_rows=8, estimator="deepfool"),
        )
    with pytest.raises(InputError, match="estimator must be one of deepfool, fmn"):
        AttackSettings(estimator="ddn").check()


def _folder(path: Path, margins: np.ndarray, converged: np.ndarray, estimator: str) -> Path:
    indices = np.arange(margins.shape[1]) * 3
    settings = {"estimator": estimator, "model": {"net": "lenet"}, "dataset": "mnist", "transform": "none"}
    write_report(path, MarginReport(margins, converged, indices, settings), figure=False)
    return path


def test_compare_margins_gives_row_by_row_ratios_of_two_estimators(tmp_path, capsys):
    rng = np.random.default_rng(0)
    deepfool = rng.uniform(1, 10, size=(4, 30))
    ratio = np.where(np.arange(30) < 20, 0.5, 1.25)  # FMN smaller on 20 of the 30 samples, in every subspace
    converged = np.ones((4, 30), bool)
    converged[1, :5] = False  # not margins: left out of the ratios of subspace 1
    a = _folder(tmp_path / "deepfool", deepfool, np.ones((4, 30), bool), "deepfool")
    b = _folder(tmp_path / "fmn", deepfool * ratio, converged, "fmn")
    out = tmp_path / "cmp"
    assert compare_margins.main([str(a), str(b), "--names", "deepfool", "fmn", "--output-dir", str(out)]) == 0
    rows = [r for r in csv.DictReader((out / "comparison.csv").open()) if r["run"] == "fmn"]
    for row in rows:
        used = ratio[5:] if row["subspace"] == "1" else ratio
        assert float(row["row_ratio_median"]) == pytest.approx(np.median(used))
        assert float(row["row_ratio_q25"]) == pytest.approx(np.percentile(used, 25))
        assert float(row["fraction_smaller"]) == pytest.approx((used < 1).mean())
        assert int(row["both_converged"]) == len(used) and float(row["wilcoxon_p"]) < 0.01
    assert (out / "row_ratios.png").is_file() and "row ratio 0.5" in capsys.readouterr().out
    assert json.loads((b / "summary.json").read_text())["settings"]["estimator"] == "fmn"
