"""The certifier through every driver: `--estimator certify` in evaluate_margin.py (in process), the same rows,
chunks, processes and resume as DeepFool and FMN; compare_margins.py's interval of a certified folder and an
attack's folder; scripts/certify_study.py on tiny checkpoints.

References: DeepFool's margins on the same rows (every converged DeepFool row is a real label change, so a certified
bound above it would be wrong); an uninterrupted single-process run (bit for bit); medians and ratios recomputed
with numpy from the arrays written.
"""

from __future__ import annotations

import contextlib
import csv
import io
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
from torch import nn
from torch.utils.data import TensorDataset

import compare_margins
import evaluate_margin
from attacks.certify import UnsupportedLayerError
from frequency import DCTBlockSubspaces
from margins import MarginReport, read_report, write_report
from margins.run.evaluate import evaluate_margins
from margins.settings import AttackSettings, RowSettings, RunSettings
from models import build_model
from tests.conftest import REPO, write_idx_mnist

ARRAYS = [f"{n}.npy" for n in ("margins", "converged", "iterations", "perturbed_labels", "indices", "predicted",
                               "targets")]  # fmt: skip
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def lenet(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("certify")
    write_idx_mnist(root / "data")
    torch.manual_seed(0)
    torch.save(build_model("lenet").state_dict(), root / "lenet.t7")
    return SimpleNamespace(root=root, data=root / "data", ckpt=root / "lenet.t7")


def _argv(s: SimpleNamespace, out: Path, estimator: str = "certify") -> list[str]:
    """3 samples x 2 subspaces (8x8 blocks at 0 and 20) in chunks of 3 rows: 2 chunks."""
    return [
        "--model", "lenet", "--dataset", "mnist", "--checkpoint", str(s.ckpt), "--data-dir", str(s.data),
        "--num-samples", "3", "--subspace-step", "20", "--chunk-rows", "3", "--estimator", estimator,
        "--accelerator", "cpu", "--no-progress", "--output-dir", str(out),
    ]  # fmt: skip


def _in_process(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = evaluate_margin.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def certified(lenet) -> SimpleNamespace:
    """`--estimator certify` and DeepFool on the same rows, in process."""
    folder, deepfool = lenet.root / "certified", lenet.root / "deepfool"
    code, printed, err = _in_process(_argv(lenet, folder))
    assert code == 0, err
    assert _in_process(_argv(lenet, deepfool, "deepfool"))[0] == 0
    return SimpleNamespace(folder=folder, printed=printed, deepfool=deepfool)


def test_certify_writes_a_lower_bound_folder_like_deepfools(certified):
    report, attack = read_report(certified.folder), read_report(certified.deepfool)
    s = report.settings
    assert s["estimator"] == "certify" and s["bound"] == "lower" and s["dtype"] == "float64"
    assert s["estimator_settings"]["bound"] == "lower" and s["estimator_settings"]["method"] == "crown"
    assert not {"overshoot", "max_iter", "num_candidates", "kernels"} & set(s)  # DeepFool's settings: not its own
    assert attack.settings["bound"] == "upper" and attack.settings["dtype"] == "float32"
    names = {p.name for p in certified.folder.iterdir()}
    assert names == {p.name for p in certified.deepfool.iterdir()} and "margins.png" in names
    np.testing.assert_array_equal(report.indices, attack.indices)
    rows = attack.converged
    assert rows.any() and (report.margins >= 0).all() and (report.margins > 0).any()
    assert (report.margins[rows] <= attack.margins[rows]).all()  # a real label change caps every certificate
    chunks = [np.load(p) for p in sorted((certified.folder / "chunks").glob("chunk-*.npz"))]
    stored = np.concatenate([c["margins"] for c in chunks])
    assert stored.dtype == np.float64 and (report.margins.T.ravel().astype(np.float64) <= stored).all()  # rounded down
    lines = certified.printed.splitlines()
    assert lines[0] == "lenet on mnist: 3 samples, 2 subspaces, certified lower bounds on the margin"
    medians = " ".join(f"{v:.3g}" for v in np.median(report.margins.astype(np.float64), axis=1))
    assert lines[1] == f"median certified lower bound per subspace (low -> high frequency): {medians}"
    assert not any("margin" in line and "certified" not in line for line in lines[:3])
    assert "float64" in certified.printed


def test_certify_chunks_are_smaller_by_default(lenet, tmp_path):
    """A chunk is the unit of progress and resume: the certifier's are 64 rows, DeepFool's 512."""
    from margins.inputs import ModelSource
    from margins.run.evaluate import job_from_checkpoint
    from margins.settings import RowSettings

    source = ModelSource(lenet.ckpt, "lenet", "mnist", data_dir=str(lenet.data))
    rows = {}
    for estimator in ("certify", "deepfool"):
        attack = AttackSettings(estimator=estimator)
        job = job_from_checkpoint(source, RowSettings(num_samples=2), attack, tmp_path)
        rows[estimator] = job.settings["chunk_rows"]
        assert job.attack.chunk_rows == rows[estimator] and attack.chunk_rows is None  # the caller's: unchanged
    assert rows == {"certify": 64, "deepfool": 512}


def test_an_unsupported_layer_stops_before_anything_is_written(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))
    data = TensorDataset(torch.rand(4, 1, 4, 4), torch.arange(4) % 3)
    with pytest.raises(UnsupportedLayerError, match="Tanh"):
        evaluate_margins(
            rows=RowSettings(num_samples=2),
            model=model,
            dataset=data,
            subspaces=DCTBlockSubspaces((1, 4, 4), 2, 2),
            output_dir=tmp_path / "out",
            attack=AttackSettings(estimator="certify"),
            run=RunSettings(accelerator="cpu", progress=False),
        )
    assert not (tmp_path / "out").exists()


def test_an_unsupported_layer_is_one_line_and_exit_2(lenet, tmp_path, monkeypatch):
    from models.lenet import LeNet

    def tanh_forward(self, x):  # LeNet with a tanh after fc1: the same weights, a layer the certifier cannot bound
        out = torch.nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        out = torch.nn.functional.max_pool2d(torch.relu(self.conv2(out)), 2).flatten(1)
        return self.fc3(torch.relu(self.fc2(torch.tanh(self.fc1(out)))))

    monkeypatch.setattr(LeNet, "forward", tanh_forward)
    code, out, err = _in_process(_argv(lenet, tmp_path / "out"))
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert err.startswith("error: the certifier does not support layer") and "tanh" in err
    assert not (tmp_path / "out").exists()


GATED = """
import os, sys, time
from pathlib import Path
import margins.store.chunks
gate, commit = Path(os.environ["MARGINS_TEST_GATE"]), margins.store.chunks.ChunkStore.commit
def gated(self, chunk, arrays, rank, *args, **kwargs):  # once a chunk is committed, wait for the test's kill
    commit(self, chunk, arrays, rank, *args, **kwargs)
    (gate / "committed").touch()
    while True:
        time.sleep(0.05)
margins.store.chunks.ChunkStore.commit = gated
import evaluate_margin
sys.exit(evaluate_margin.main(sys.argv[1:]))
"""


@pytest.mark.timeout(300)
def test_a_killed_certify_run_resumes_to_the_same_files(lenet, certified, tmp_path):
    out, gate = tmp_path / "killed", tmp_path / "gate"
    gate.mkdir()
    (tmp_path / "gated.py").write_text(GATED)
    env = {**ENV, "MARGINS_TEST_GATE": str(gate)}
    proc = subprocess.Popen([sys.executable, str(tmp_path / "gated.py"), *_argv(lenet, out)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.time() + 240
        while not (gate / "committed").exists():  # the handshake: one chunk committed, the run held there
            assert proc.poll() is None, proc.communicate()[1]
            assert time.time() < deadline, "no chunk committed within 240 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert not (out / "summary.json").exists() and len(list((out / "chunks").glob("chunk-*.npz"))) == 1
    code, _, err = _in_process(_argv(lenet, out))
    assert code == 0, err
    assert read_report(out).extra["num_chunks"] == 2
    for name in ARRAYS:
        assert (out / name).read_bytes() == (certified.folder / name).read_bytes(), name


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_certify_on_two_processes_equals_one_bit_for_bit(lenet, certified, tmp_path):
    out = tmp_path / "two"
    cmd = [sys.executable, str(REPO / "evaluate_margin.py"), *_argv(lenet, out), "--devices", "2"]
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=360)
    assert done.returncode == 0, done.stderr
    assert read_report(out).settings["estimator"] == "certify"
    for name in ARRAYS:
        assert (out / name).read_bytes() == (certified.folder / name).read_bytes(), name


def _folder(path: Path, margins: np.ndarray, estimator: str, indices: np.ndarray, converged=None) -> Path:
    converged = np.ones(margins.shape, bool) if converged is None else converged
    settings = {"estimator": estimator, "model": {"net": "lenet"}, "dataset": "mnist", "transform": "none"}
    write_report(path, MarginReport(margins, converged, indices, settings), figure=False)
    return path


def test_compare_margins_shows_the_interval_of_a_certified_and_an_attack_folder(tmp_path, capsys):
    rng = np.random.default_rng(0)
    attack = rng.uniform(1, 10, size=(5, 30)).astype(np.float32)
    lower = (attack * rng.uniform(0.05, 0.5, size=attack.shape)).astype(np.float32)
    indices = np.arange(30) * 7
    order = rng.permutation(30)  # the same samples in another column order: aligned by dataset index
    converged = np.ones(attack.shape, bool)
    converged[2, :4] = False  # no label change found: not an upper bound, left out of the row ratios
    certified = _folder(tmp_path / "certified", lower, "certify", indices)
    fmn = _folder(tmp_path / "fmn", attack[:, order], "fmn", indices[order], converged[:, order])
    out = tmp_path / "cmp"
    assert compare_margins.main([str(certified), str(fmn), "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader((out / "interval.csv").open()))
    assert len(rows) == 5 and (out / "interval.png").is_file()
    for s, row in enumerate(rows):
        keep = converged[s]
        assert row["lower_run"] == "certified" and row["upper_run"] == "fmn"
        assert float(row["lower_median"]) == pytest.approx(np.median(lower[s].astype(np.float64)))
        assert float(row["upper_median"]) == pytest.approx(np.median(attack[s].astype(np.float64)))
        assert float(row["median_ratio"]) == pytest.approx(np.median(lower[s]) / np.median(attack[s]), rel=1e-6)
        ratios = lower[s, keep].astype(np.float64) / attack[s, keep]
        assert float(row["row_ratio_median"]) == pytest.approx(np.median(ratios))
        assert int(row["rows"]) == keep.sum() and int(row["lower_above_upper"]) == 0
    assert "certified lower bound (certified) <= true margin <= FMN margin (fmn)" in printed
    first = f"{np.median(lower[0].astype(np.float64)):16.4g}"
    assert any(line.startswith(f"       0  {first}") for line in printed.splitlines())
    assert "median certified lower bound" in printed  # the comparison lines name what each run holds


def test_a_certified_bound_above_an_attack_margin_is_counted(tmp_path, capsys):
    attack = np.full((2, 4), 2.0, np.float32)
    lower = np.array([[1.0, 1.0, 3.0, 1.0], [1.0, 1.0, 1.0, 1.0]], np.float32)  # one contradicted certificate
    certified = _folder(tmp_path / "c", lower, "certify", np.arange(4))
    deepfool = _folder(tmp_path / "d", attack, "deepfool", np.arange(4))
    assert compare_margins.main([str(deepfool), str(certified), "--output-dir", str(tmp_path / "o")]) == 0
    rows = list(csv.DictReader((tmp_path / "o" / "interval.csv").open()))
    assert [int(r["lower_above_upper"]) for r in rows] == [1, 0]
    assert "1 of 4 rows" in capsys.readouterr().out


def test_no_interval_for_folders_of_other_samples_or_two_attacks(tmp_path):
    margins = np.ones((2, 4), np.float32)
    a = _folder(tmp_path / "a", margins, "deepfool", np.arange(4))
    b = _folder(tmp_path / "b", margins, "fmn", np.arange(4))
    c = _folder(tmp_path / "c", margins * 0.5, "certify", np.arange(4) + 10)
    assert compare_margins.main([str(a), str(b), str(c), "--output-dir", str(tmp_path / "o")]) == 0
    assert not (tmp_path / "o" / "interval.csv").exists() and (tmp_path / "o" / "comparison.csv").exists()
    assert json.loads((c / "summary.json").read_text())["settings"]["estimator"] == "certify"


@pytest.mark.slow
def test_the_callbacks_certify_equals_evaluate_margin_on_the_saved_checkpoint(tmp_path):
    """`MarginCallback(estimator="certify")`: the same chunk work, so the same bits as the command on the checkpoint
    of the weights it measured (a one-epoch fit), in float64."""
    from callbacks import MarginCallback
    from tests.test_margin_callback import assert_same_results, fit_with_callback

    callback = MarginCallback(
        rows=RowSettings(num_samples=3, seed=1, subspace_dim=8, subspace_step=8),
        attack=AttackSettings(estimator="certify", chunk_rows=4),
        progress=False,
    )
    trainer, _ = fit_with_callback(tmp_path, callback, epochs=1)
    folder = Path(trainer.log_dir) / "margins" / "epoch_000"
    trainer.save_checkpoint(tmp_path / "final.ckpt")
    out = tmp_path / "cli"
    argv = ["--checkpoint", tmp_path / "final.ckpt", "--num-samples", 3, "--seed", 1, "--subspace-dim", 8,
            "--subspace-step", 8, "--estimator", "certify", "--chunk-rows", 4, "--no-progress",
            "--output-dir", out]  # fmt: skip
    code, _, err = _in_process([str(a) for a in argv])
    assert code == 0, err
    assert_same_results(folder, out)
    saved = read_report(folder)
    assert saved.settings["bound"] == "lower" and saved.settings["dtype"] == "float64"
    assert saved.settings["estimator_settings"] == read_report(out).settings["estimator_settings"]


def test_progress_bars_say_what_they_measure():
    from margins.run.predict import progress_description

    def described(settings: dict) -> str:
        return progress_description(SimpleNamespace(job=SimpleNamespace(settings=settings)))

    certify = described({"estimator": "certify", "subspace": "dct"})
    assert certify == "certified lower bounds along dct subspaces: (sample, subspace) rows"
    assert described({"estimator": "fmn", "subspace": "random"}).startswith("FMN margins along random subspaces")
