"""Margin callback: files, TensorBoard tags, schedule, and DDP equivalence with a single process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from attacks.deepfool import SubspaceDeepFool
from callbacks import MarginCallback
from datamodules import SyntheticDataModule
from lightning_modules import ClassifierModule
from margins import gather_samples, read_margin_results, select_indices

REPO = Path(__file__).resolve().parents[1]
SYNTHETIC = dict(image_shape=(1, 16, 16), num_train=256, num_test=64, batch_size=64, sigma=0.5, eps=4.0)


def fit_with_callback(tmp_path: Path, callback: MarginCallback, epochs: int = 2) -> tuple[L.Trainer, ClassifierModule]:
    L.seed_everything(0)
    dm = SyntheticDataModule(**SYNTHETIC)
    model = ClassifierModule(net="lenet", num_classes=2, image_shape=(1, 16, 16), lr=0.2)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=epochs,
        accelerator="cpu",
        logger=TensorBoardLogger(tmp_path, name="run"),
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=1,
    )
    trainer.fit(model, dm)
    return trainer, model


def test_callback_writes_results_equal_to_a_direct_engine_call_and_logs_tensorboard_tags(tmp_path):
    callback = MarginCallback(num_samples=12, seed=3, every_n_epochs=2, max_iter=50)
    trainer, model = fit_with_callback(tmp_path, callback, epochs=3)
    margins_root = Path(trainer.log_dir) / "margins"
    # every 2nd epoch (no sanity check run), and the final weights at the end of fit
    assert sorted(p.name for p in margins_root.iterdir()) == ["epoch_001", "epoch_002"]

    saved = read_margin_results(margins_root / "epoch_001")
    dm = trainer.datamodule
    indices = select_indices(len(dm.margin_dataset()), 12, 3)
    np.testing.assert_array_equal(saved["indices"], indices)
    assert saved["margins"].shape == (len(dm.subspaces()), 12) and saved["converged"].dtype == bool
    summary = saved["summary"]
    assert summary["settings"]["subspace_block"] == dm.subspace_block and summary["settings"]["epoch"] == 1
    assert summary["settings"]["data"]["dataset"] == "synthetic"
    assert 0.0 <= summary["extra"]["clean_accuracy"] <= 1.0 and summary["extra"]["seconds"] > 0

    events = EventAccumulator(str(trainer.log_dir), size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    num_subspaces = saved["margins"].shape[0]
    for s in range(num_subspaces):
        assert f"margin/median/subspace_{s:02d}" in tags["scalars"]
        assert f"margin/subspace_{s:02d}" in tags["histograms"]
        logged = events.Scalars(f"margin/median/subspace_{s:02d}")[0].value  # epoch_001; [1] is the fit end
        assert logged == pytest.approx(float(np.median(saved["margins"][s])), rel=1e-5, abs=1e-6)
        assert logged == pytest.approx(summary["stats"]["median_margin_all"][s], rel=1e-5, abs=1e-6)
    assert "margin/distribution" in tags["images"]
    assert "val/acc" in tags["scalars"]


def test_callback_margins_equal_a_direct_engine_call_on_the_final_model(tmp_path):
    callback = MarginCallback(num_samples=10, seed=0, every_n_epochs=1, max_iter=50)
    trainer, model = fit_with_callback(tmp_path, callback, epochs=1)  # the last validation sees the final weights
    saved = read_margin_results(Path(trainer.log_dir) / "margins" / "epoch_000")
    dm = trainer.datamodule
    x, _ = gather_samples(dm.margin_dataset(), saved["indices"])
    direct = SubspaceDeepFool(max_iter=50)(model, x, dm.subspaces())
    np.testing.assert_allclose(saved["margins"], direct.margins.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(saved["converged"], direct.converged.numpy())
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_callback_runs_in_validate_and_test_under_inference_mode(tmp_path):
    L.seed_everything(0)
    dm = SyntheticDataModule(**SYNTHETIC)
    model = ClassifierModule(net="lenet", num_classes=2, image_shape=(1, 16, 16))
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=TensorBoardLogger(tmp_path, name="run"),
        callbacks=[MarginCallback(num_samples=4, max_iter=5, every_n_epochs=7)],
        enable_progress_bar=False,
        inference_mode=True,
    )
    flags = [m.training for m in model.modules()]
    trainer.validate(model, dm)
    trainer.test(model, dm)
    names = sorted(p.name for p in (Path(trainer.log_dir) / "margins").iterdir())
    assert names == ["epoch_000", "test_epoch_000"]
    assert [m.training for m in model.modules()] == flags
    assert all(p.grad is None for p in model.parameters())


def run_cli(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
def test_ddp_fit_and_validate_margins_equal_one_process_bit_for_bit(tmp_path):
    """Chunk sharding: 2 processes give the 1-process bits, also when rank 1 gets no chunk (num_samples 1)."""
    common = [
        "--config", str(REPO / "configs" / "synthetic_lenet.yaml"),
        "--data.init_args.num_train", "256", "--data.init_args.num_test", "64",
        "--data.init_args.image_shape", "[1, 16, 16]",
        "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
        "--margin.max_iter", "50", "--margin.batch_size", "16",
    ]  # fmt: skip
    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
    # 2-process fit, margins only at fit end (1 sample x 9 subspaces = one chunk: rank 1 attacks nothing)
    run_cli(["fit", *common, *ddp, "--trainer.max_epochs", "1", "--margin.num_samples", "1",
             "--margin.every_n_epochs", "5", "--data.init_args.batch_size", "64",
             "--trainer.logger.init_args.save_dir", str(tmp_path / "fit")], cwd=tmp_path)  # fmt: skip
    ckpt = next((tmp_path / "fit").rglob("last.ckpt"))
    trained = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert trained["global_step"] == 2  # 256 samples / (2 processes x batch 64): each rank ran half the batches
    runs = {"fit_ddp": read_margin_results(next((tmp_path / "fit").rglob("epoch_000")))}
    for name, samples, devices in (("one_1", "1", []), ("one_11", "11", []), ("ddp_11", "11", ddp)):
        run_cli(["validate", *common, *devices, "--ckpt_path", str(ckpt), "--margin.num_samples", samples,
                 "--trainer.logger.init_args.save_dir", str(tmp_path / name)], cwd=tmp_path)  # fmt: skip
        runs[name] = read_margin_results(next((tmp_path / name).rglob("epoch_000")))
    for multi, single in (("fit_ddp", "one_1"), ("ddp_11", "one_11")):
        a, b = runs[multi], runs[single]
        assert a["summary"]["settings"]["world_size"] == 2 and b["summary"]["settings"]["world_size"] == 1
        np.testing.assert_array_equal(a["indices"], b["indices"])
        np.testing.assert_array_equal(a["margins"], b["margins"])  # bit-equal, not just close
        np.testing.assert_array_equal(a["converged"], b["converged"])
        for key in ("clean_accuracy", "mean_iterations", "max_iterations"):
            assert a["summary"]["extra"][key] == b["summary"]["extra"][key], key
    assert runs["ddp_11"]["margins"].shape == (9, 11) and len(set(runs["ddp_11"]["indices"].tolist())) == 11
