"""Margin callback: files, TensorBoard tags, schedule, the same bits as evaluate_margin.py on the saved checkpoint,
a folder of another measurement kept (the new one next to it), a folder of the same one resumed under its lock, and
DDP equivalence with a single process."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import evaluate_margin
from attacks.deepfool import SubspaceDeepFool
from callbacks import MarginCallback
from callbacks.margin import median_tags, other_measurement
from common.errors import InputError
from datamodules import SyntheticDataModule
from frequency import DCTBlockSubspaces
from lightning_modules import ClassifierModule
from margins import MarginReport, read_report, select_indices, write_report
from margins.inputs import gather_samples
from margins.run.evaluate import fingerprint_of, state_sha256
from margins.settings import AttackSettings, RowSettings

REPO = Path(__file__).resolve().parents[1]
SYNTHETIC = dict(image_shape=(1, 16, 16), num_train=256, num_test=64, batch_size=64, sigma=0.5, eps=4.0)
# the arrays of a result folder, whichever command wrote it
ARRAYS = ("margins", "iterations", "converged", "perturbed_labels", "indices", "predicted", "targets")
RESULT_FILES = {*(f"{name}.npy" for name in ARRAYS), "margins.png", "summary.json"}


def assert_same_results(a: Path, b: Path) -> None:
    """Every array file of two result folders holds the same bytes (dtype, shape and values)."""
    for name in ARRAYS:
        assert (a / f"{name}.npy").read_bytes() == (b / f"{name}.npy").read_bytes(), name


def fit_with_callback(
    tmp_path: Path,
    callback: MarginCallback,
    epochs: int = 2,
    lr: float = 0.2,
    version: str | None = None,
    precision: str = "32-true",
) -> tuple[L.Trainer, ClassifierModule]:
    L.seed_everything(0)
    dm = SyntheticDataModule(**SYNTHETIC)
    model = ClassifierModule(net="lenet", num_classes=2, image_shape=(1, 16, 16), lr=lr)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=epochs,
        accelerator="cpu",
        precision=precision,
        logger=TensorBoardLogger(tmp_path, name="run", version=version),
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=1,
    )
    trainer.fit(model, dm)
    return trainer, model


def test_callback_writes_results_equal_to_a_direct_engine_call_and_logs_tensorboard_tags(tmp_path):
    callback = MarginCallback(
        rows=RowSettings(num_samples=12, seed=3), attack=AttackSettings(max_iter=50), every_n_epochs=2
    )
    trainer, model = fit_with_callback(tmp_path, callback, epochs=3)
    margins_root = Path(trainer.log_dir) / "margins"
    # every 2nd epoch (no sanity check run), and the final weights at the end of fit
    assert sorted(p.name for p in margins_root.iterdir()) == ["epoch_001", "epoch_002"]

    saved = read_report(margins_root / "epoch_001")
    dm = trainer.datamodule
    indices = select_indices(len(dm.margin_dataset()), 12, 3)
    np.testing.assert_array_equal(saved.indices, indices)
    assert saved.margins.shape == (len(dm.subspaces()), 12) and saved.converged.dtype == bool
    assert saved.perturbed_labels.shape == saved.margins.shape and saved.perturbed_labels.dtype == np.int64
    assert {p.name for p in (margins_root / "epoch_001").iterdir() if p.is_file()} == RESULT_FILES
    settings = saved.settings
    assert settings["subspace_dim"] == dm.subspace_block and settings["epoch"] == 1 and settings["run"] == "epoch_001"
    assert settings["data"]["dataset"] == "synthetic" and settings["trainer_precision"] == "32-true"
    assert settings["kernels"] == "auto" and settings["cpu_threads"] == 1 and "channels_last" not in settings
    final = read_report(margins_root / "epoch_002")  # the fit end: the final weights
    assert final.settings["epoch"] == 2 and final.settings["checkpoint_sha256"] == state_sha256(model.model)
    assert settings["checkpoint_sha256"] != final.settings["checkpoint_sha256"]  # epoch 1's weights
    assert 0.0 <= saved.extra["clean_accuracy"] <= 1.0 and saved.extra["seconds"] > 0
    assert saved.extra["clean_accuracy"] == float((saved.predicted == saved.targets).mean())

    events = EventAccumulator(str(trainer.log_dir), size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    num_subspaces = saved.margins.shape[0]
    for s, tag in enumerate(median_tags(num_subspaces)):
        assert tag in tags["scalars"]
        logged = events.Scalars(tag)[0].value  # epoch_001; [1] is the fit end
        assert logged == pytest.approx(float(np.median(saved.margins[s])), rel=1e-5, abs=1e-6)
        assert logged == pytest.approx(saved.stats["median_margin_all"][s], rel=1e-5, abs=1e-6)
    assert set(tags["histograms"]) == {"margin/histogram/low_band", "margin/histogram/high_band"}  # a few cards
    assert "margin/distribution" in tags["images"]
    assert "val/acc" in tags["scalars"]


def test_callback_folder_equals_evaluate_margin_on_the_saved_checkpoint_bit_for_bit(tmp_path, capsys):
    """The callback runs the chunk work of evaluate_margin.py: on the checkpoint of the weights it measured (the last
    validation of a one-epoch fit sees the final weights), with the same samples, DeepFool settings and chunks, the
    command writes the same bytes; both are close to the engine called directly on the whole grid."""
    callback = MarginCallback(
        rows=RowSettings(num_samples=10, seed=2), attack=AttackSettings(max_iter=50, chunk_rows=16), every_n_epochs=1
    )
    trainer, model = fit_with_callback(tmp_path, callback, epochs=1)
    folder = Path(trainer.log_dir) / "margins" / "epoch_000"
    assert sorted(p.name for p in folder.parent.iterdir()) == ["epoch_000"]  # the fit end saw the same weights
    trainer.save_checkpoint(tmp_path / "final.ckpt")
    out = tmp_path / "cli"
    argv = ["--checkpoint", tmp_path / "final.ckpt", "--num-samples", 10, "--seed", 2, "--max-iter", 50]
    flags = [*argv, "--chunk-rows", 16, "--threads", 1, "--output-dir", out, "--no-progress"]  # the callback's 1
    assert evaluate_margin.main([str(a) for a in flags]) == 0
    capsys.readouterr()
    assert_same_results(folder, out)
    saved, cli = read_report(folder), read_report(out)
    assert saved.extra["num_chunks"] == cli.extra["num_chunks"] == 6  # 10 samples x 9 subspaces in chunks of 16
    assert {p.name for p in folder.iterdir()} == {p.name for p in out.iterdir()}  # the same result files
    for key in ("subspace_sha256", "indices_sha256", "chunk_rows", "max_iter", "kernels", "dtype", "engine_version"):
        assert saved.settings[key] == cli.settings[key], key

    dm = trainer.datamodule
    x, _ = gather_samples(dm.margin_dataset(), saved.indices)
    direct = SubspaceDeepFool(max_iter=50)(model.model, x, dm.subspaces())
    np.testing.assert_allclose(saved.margins, direct.margins.numpy(), rtol=1e-5)
    np.testing.assert_array_equal(saved.converged, direct.converged.numpy())
    np.testing.assert_array_equal(saved.predicted, direct.labels.numpy())
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_bf16_mixed_fit_measures_margins_in_float32_like_evaluate_margin(tmp_path, capsys):
    """Under `precision="bf16-mixed"` the callback still attacks in float32 (autocast switched off around the engine):
    its margins equal evaluate_margin.py's on the saved checkpoint (to 1e-5 median relative; in fact bit for bit), the
    margins are float32 and the summary records both the trainer's precision and the attack's."""
    callback = MarginCallback(
        rows=RowSettings(num_samples=8, seed=1), attack=AttackSettings(max_iter=50, chunk_rows=16), every_n_epochs=1
    )
    trainer, _ = fit_with_callback(tmp_path, callback, epochs=1, precision="bf16-mixed")
    folder = Path(trainer.log_dir) / "margins" / "epoch_000"
    trainer.save_checkpoint(tmp_path / "final.ckpt")
    out = tmp_path / "cli"
    argv = ["--checkpoint", tmp_path / "final.ckpt", "--num-samples", 8, "--seed", 1, "--max-iter", 50]
    flags = [*argv, "--chunk-rows", 16, "--threads", 1, "--output-dir", out, "--no-progress"]  # the callback's 1
    assert evaluate_margin.main([str(a) for a in flags]) == 0
    capsys.readouterr()
    saved, cli = read_report(folder), read_report(out)
    assert saved.margins.dtype == np.float32
    relative = np.abs(saved.margins - cli.margins) / np.maximum(np.abs(cli.margins), 1e-12)
    assert np.median(relative) <= 1e-5
    assert_same_results(folder, out)
    assert saved.settings["trainer_precision"] == "bf16-mixed"
    assert saved.settings["precision"]["dtype"] == cli.settings["precision"]["dtype"] == "float32"


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`: relative path -> bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def notes(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("note:")]


def test_a_folder_holding_another_measurement_is_kept_and_the_new_one_goes_next_to_it(tmp_path, capsys):
    """Fits logging into the same version folder, with other margin settings, then other weights: every earlier
    folder keeps its bytes, each new measurement goes to the first free folder next to it (one note line saying
    what the run's folder holds), and the history, title and TensorBoard still name the epoch."""
    fit_with_callback(
        tmp_path,
        MarginCallback(rows=RowSettings(num_samples=4), attack=AttackSettings(max_iter=20, chunk_rows=8)),
        epochs=1,
        version="same",
    )
    root = tmp_path / "run" / "same" / "margins"
    first = folder_bytes(root / "epoch_000")
    capsys.readouterr()

    callback = MarginCallback(
        rows=RowSettings(num_samples=6), attack=AttackSettings(max_iter=20, chunk_rows=8)
    )  # other settings, the same weights
    trainer, model = fit_with_callback(tmp_path, callback, epochs=1, version="same")
    sha, printed = state_sha256(model.model)[:12], capsys.readouterr()
    [note] = notes(printed.err)
    assert re.fullmatch(
        rf"note: {re.escape(str(root / 'epoch_000'))} holds another measurement \(DeepFool margins of weights {sha}; "
        rf"num_samples 4 \(now 6\); indices_sha256 .*\); this one goes to {re.escape(str(root / 'epoch_000-2'))}",
        note,
    ), note
    assert folder_bytes(root / "epoch_000") == first
    assert sorted(p.name for p in root.iterdir()) == ["epoch_000", "epoch_000-2"]
    second = read_report(root / "epoch_000-2")
    assert second.margins.shape == (9, 6) and second.settings["run"] == "epoch_000"
    assert callback.history[0] == np.median(second.margins, axis=1).tolist()
    summary = rf"margins epoch 0: 6 samples x 9 subspaces in .* -> {re.escape(str(root / 'epoch_000-2'))}\n"
    assert re.search(summary, printed.out), printed.out
    events = EventAccumulator(str(trainer.log_dir), size_guidance={"scalars": 0})
    events.Reload()
    assert "margin/profile/epoch_000-2" in events.Tags()["scalars"]
    kept = folder_bytes(root / "epoch_000-2")

    callback = MarginCallback(
        rows=RowSettings(num_samples=4), attack=AttackSettings(max_iter=20, chunk_rows=8)
    )  # the first settings, other weights
    trainer, model = fit_with_callback(tmp_path, callback, epochs=1, lr=0.05, version="same")
    [note] = notes(capsys.readouterr().err)
    assert note == (
        f"note: {root / 'epoch_000'} holds another measurement (DeepFool margins of weights {sha} (now "
        f"{state_sha256(model.model)[:12]}); model.lr 0.2 (now 0.05)); so does epoch_000-2; this one goes to "
        f"{root / 'epoch_000-3'}"
    )
    assert folder_bytes(root / "epoch_000") == first and folder_bytes(root / "epoch_000-2") == kept
    third = read_report(root / "epoch_000-3")
    dm = trainer.datamodule
    x, _ = gather_samples(dm.margin_dataset(), third.indices)
    direct = SubspaceDeepFool(max_iter=20)(model.model, x, dm.subspaces())
    np.testing.assert_allclose(third.margins, direct.margins.numpy(), rtol=1e-5)
    journal = (root / "epoch_000-3" / "chunks" / "journal-rank0.jsonl").read_text().splitlines()
    assert len(journal) == third.extra["num_chunks"] == 5  # only its own chunks: 4 x 9 rows in chunks of 8

    results_only = tmp_path / "results_only"  # no chunks manifest: the result files say what the folder holds
    shutil.copytree(root / "epoch_000", results_only, ignore=shutil.ignore_patterns("chunks"))
    there = read_report(root / "epoch_000").settings
    assert other_measurement(results_only, fingerprint_of(there)) is None
    indices = json.dumps(there["indices_sha256"])[:21]
    assert other_measurement(results_only, fingerprint_of(second.settings)) == (
        f"DeepFool margins of weights {sha}; num_samples 4 (now 6); indices_sha256 {indices}... (now "
        f"{json.dumps(second.settings['indices_sha256'])[:21]}...)"
    )


def test_a_folder_of_the_same_measurement_is_resumed_in_place_under_its_lock(tmp_path, capsys, monkeypatch):
    """The same fit twice into one version folder, the first measurement cut after two committed chunks and before
    its results: the second resumes it in the same folder (those chunk files untouched, no note, no second folder),
    holds the folder's lock while it writes, and gives the same bytes."""
    fit_with_callback(
        tmp_path,
        MarginCallback(rows=RowSettings(num_samples=4), attack=AttackSettings(max_iter=20, chunk_rows=8)),
        epochs=1,
        version="same",
    )
    root = tmp_path / "run" / "same" / "margins"
    folder, margins = root / "epoch_000", (root / "epoch_000" / "margins.npy").read_bytes()
    journal = folder / "chunks" / "journal-rank0.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join(lines[:2]))  # killed before the third chunk's journal line
    for name in RESULT_FILES:
        (folder / name).unlink()
    chunks = [folder / "chunks" / json.loads(line)["file"] for line in lines[:2]]
    before = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in chunks]
    locked: list[int] = []

    def spy(out_dir: Path, *args, **kwargs) -> Path:
        locked.append(json.loads((Path(out_dir) / ".lock").read_text())["pid"])
        return write_report(out_dir, *args, **kwargs)

    monkeypatch.setattr("margins.run.evaluate.write_report", spy)  # the one writer of both paths
    capsys.readouterr()
    fit_with_callback(
        tmp_path,
        MarginCallback(rows=RowSettings(num_samples=4), attack=AttackSettings(max_iter=20, chunk_rows=8)),
        epochs=1,
        version="same",
    )
    assert notes(capsys.readouterr().err) == []
    assert sorted(p.name for p in root.iterdir()) == ["epoch_000"]
    assert locked == [os.getpid()] and not (folder / ".lock").exists()
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in chunks] == before
    assert len(journal.read_text().splitlines()) == 5  # 2 kept + the 3 attacked now
    assert (folder / "margins.npy").read_bytes() == margins


def test_a_full_disk_while_the_callback_writes_is_the_commands_one_line_error_and_nothing_half_written(
    tmp_path, monkeypatch
):
    """The training measurement ends as the commands' does (`margins.run.evaluate.measure_chunks`, one code path): the
    disk fills while the result files are written, and the fit raises the one-line InputError naming the folder and
    the space the results need (not the bare OSError); every chunk stays committed, no result file whole or half."""
    from tests.test_no_hang import FullDisk

    disk = FullDisk(monkeypatch, r"/\.epoch_000\.tmp-[^/]*/", free=1200)
    callback = MarginCallback(
        rows=RowSettings(num_samples=4), attack=AttackSettings(max_iter=20, chunk_rows=8), log_figure=False
    )
    with pytest.raises(InputError, match=r"^no space left on the disk holding .*epoch_000") as raised:
        fit_with_callback(tmp_path, callback, epochs=1, version="full")
    assert disk.failed and "\n" not in str(raised.value)
    folder = tmp_path / "run" / "full" / "margins" / "epoch_000"
    assert sorted(p.name for p in folder.iterdir()) == ["chunks"]
    assert (
        len((folder / "chunks" / "journal-rank0.jsonl").read_text().splitlines()) == 5
    )  # every chunk committed (5 of 8 rows at most)


def test_callback_runs_in_validate_and_test_under_inference_mode(tmp_path):
    L.seed_everything(0)
    dm = SyntheticDataModule(**SYNTHETIC)
    model = ClassifierModule(net="lenet", num_classes=2, image_shape=(1, 16, 16))
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=TensorBoardLogger(tmp_path, name="run"),
        callbacks=[
            MarginCallback(
                rows=RowSettings(num_samples=4, subspace_dim=4, subspace_step=4),
                attack=AttackSettings(max_iter=5),
                every_n_epochs=7,
            )
        ],
        enable_progress_bar=False,
        inference_mode=True,
    )
    flags = [m.training for m in model.modules()]
    trainer.validate(model, dm)
    trainer.test(model, dm)
    root = Path(trainer.log_dir) / "margins"
    names = sorted(p.name for p in root.iterdir())
    assert names == ["epoch_000", "test_epoch_000"]
    validated, tested = read_report(root / "epoch_000"), read_report(root / "test_epoch_000")
    assert validated.settings["epoch"] == tested.settings["epoch"] == 0  # the folder's epoch
    assert tested.settings["run"] == "test_epoch_000"
    family = DCTBlockSubspaces((1, 16, 16), 4, 4)  # subspace_dim / subspace_step, not the datamodule's 8 / 1
    assert (validated.settings["subspace_dim"], validated.settings["subspace_step"]) == (4, 4)
    assert validated.settings["subspace_family"] == repr(family) and validated.margins.shape == (len(family), 4)
    assert_same_results(root / "epoch_000", root / "test_epoch_000")  # the same weights, samples and settings
    assert [m.training for m in model.modules()] == flags
    assert all(p.grad is None for p in model.parameters())


def run_cli(args: list[str], cwd: Path) -> None:
    """train.py in a subprocess with the machine's default thread settings (no OMP_NUM_THREADS): the callback pins
    its own thread count while it measures, so 1 and 2 processes agree whatever the defaults."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("OMP_NUM_THREADS", None)  # tests/conftest.py sets it for this process
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
def test_ddp_fit_and_validate_margins_equal_one_process_bit_for_bit(tmp_path):
    """Chunk sharding: 2 gloo processes give the 1-process bits, also when a rank gets no chunk (num_samples 1)."""
    common = [
        "--config", str(REPO / "configs" / "synthetic_lenet.yaml"),
        "--data.init_args.num_train", "256", "--data.init_args.num_test", "64",
        "--data.init_args.image_shape", "[1, 16, 16]",
        "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
        "--margin.attack.max_iter", "50", "--margin.attack.chunk_rows", "16", "--margin.progress", "false",
    ]  # fmt: skip
    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
    # 2-process fit, margins only at fit end (1 sample x 9 subspaces = one chunk: one rank attacks nothing)
    run_cli(["fit", *common, *ddp, "--trainer.max_epochs", "1", "--margin.rows.num_samples", "1",
             "--margin.every_n_epochs", "5", "--data.init_args.batch_size", "64",
             "--trainer.logger.init_args.save_dir", str(tmp_path / "fit")], cwd=tmp_path)  # fmt: skip
    ckpt = next((tmp_path / "fit").rglob("last.ckpt"))
    trained = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert trained["global_step"] == 2  # 256 samples / (2 processes x batch 64): each rank ran half the batches
    folders = {"fit_ddp": next((tmp_path / "fit").rglob("epoch_000"))}
    for name, samples, devices in (("one_1", "1", []), ("one_11", "11", []), ("ddp_11", "11", ddp)):
        run_cli(["validate", *common, *devices, "--ckpt_path", str(ckpt), "--margin.rows.num_samples", samples,
                 "--trainer.logger.init_args.save_dir", str(tmp_path / name)], cwd=tmp_path)  # fmt: skip
        folders[name] = next((tmp_path / name).rglob("epoch_000"))
    runs: dict[str, MarginReport] = {name: read_report(folder) for name, folder in folders.items()}
    for multi, single in (("fit_ddp", "one_1"), ("ddp_11", "one_11")):
        a, b = runs[multi], runs[single]
        assert a.settings["world_size"] == 2 and b.settings["world_size"] == 1
        assert a.settings["cpu_threads"] == b.settings["cpu_threads"] == 1
        assert_same_results(folders[multi], folders[single])  # bit-equal, not just close
        for key in ("clean_accuracy", "mean_iterations", "max_iterations", "num_chunks"):
            assert a.extra[key] == b.extra[key], key
    assert runs["ddp_11"].margins.shape == (9, 11) and len(set(runs["ddp_11"].indices.tolist())) == 11
    journals = sorted(p.name for p in (folders["ddp_11"] / "chunks").glob("journal-rank*.jsonl"))
    assert journals == ["journal-rank0.jsonl", "journal-rank1.jsonl"]  # 99 rows in 7 chunks: both ranks worked
    lines = [x for p in (folders["fit_ddp"] / "chunks").glob("journal-rank*.jsonl") for x in p.read_text().splitlines()]
    assert len(lines) == 1  # one chunk, attacked once: the other rank had none
