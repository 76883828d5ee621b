"""What a researcher sees in TensorBoard from the margin callback: the schedule (fit end included), the
custom-scalars layout, scalars at the step of val/*, HPARAMS without hp_metric, the evolution history."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util

from callbacks import MarginCallback
from callbacks.margin import band_medians
from datamodules import SyntheticDataModule
from lightning_modules import ClassifierModule
from margins import read_report
from train import main

REPO = Path(__file__).resolve().parents[1]
SYNTHETIC = dict(image_shape=(1, 16, 16), num_train=128, num_test=32, batch_size=64, sigma=0.5, eps=4.0)
FAST_MARGIN = ["--margin.num_samples", "4", "--margin.max_iter", "20", "--margin.chunk_rows", "64"]


def events(log_dir: str | Path) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0, "images": 0, "histograms": 0})
    acc.Reload()
    return acc


def steps(acc: EventAccumulator, tag: str) -> list[int]:
    return [e.step for e in acc.Scalars(tag)]


def hparams_plugin_data(log_dir: str | Path) -> dict[str, plugin_data_pb2.HParamsPluginData]:
    """The last hparams plugin record per tag (`_hparams_/experiment`, `_hparams_/session_start_info`, ...)."""
    out = {}
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "hparams":
                    out[value.tag] = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
    return out


def fit(
    tmp_path: Path,
    callback: MarginCallback,
    epochs: int,
    extra: list[L.Callback] = (),
    schedule: str = "triangular",
    **trainer_kwargs,
):
    L.seed_everything(0)
    model = ClassifierModule(net="lenet", num_classes=2, image_shape=(1, 16, 16), lr=0.2, schedule=schedule)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=epochs,
        accelerator="cpu",
        logger=TensorBoardLogger(tmp_path, name="run", default_hp_metric=False),
        callbacks=[callback, *extra],
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        **trainer_kwargs,
    )
    trainer.fit(model, SyntheticDataModule(**SYNTHETIC))
    return trainer


def test_one_epoch_fit_with_the_default_config_measures_once_and_fills_the_tensorboard_view(tmp_path, monkeypatch):
    """configs/mnist_lenet.yaml as written (every_n_epochs 5, default_hp_metric false) on tiny synthetic data."""
    monkeypatch.setattr("sys.argv", ["train.py"])
    cli = main(
        [
            "fit",
            "--config",
            str(REPO / "configs" / "mnist_lenet.yaml"),
            "--data",
            "datamodules.SyntheticDataModule",
            "--data.init_args.image_shape",
            "[1, 16, 16]",
            "--data.init_args.num_train",
            "128",
            "--data.init_args.num_test",
            "32",
            "--data.init_args.batch_size",
            "64",
            "--trainer.max_epochs",
            "1",
            "--trainer.accelerator",
            "cpu",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            *FAST_MARGIN,
        ]  # fmt: skip
    )
    assert cli.config.fit.margin.every_n_epochs == 5 and cli.config.fit.margin.measure_at_fit_end
    log_dir = Path(cli.trainer.log_dir)
    assert [p.name for p in (log_dir / "margins").iterdir()] == ["epoch_000"]  # the fit-end measurement
    acc = events(log_dir)
    tags = acc.Tags()
    num_subspaces = len(cli.datamodule.subspaces())
    val_step = steps(acc, "val/acc")
    assert val_step == [cli.trainer.global_step - 1]  # 2 batches: Lightning logs epoch-end val/* at step 1
    for tag in ("margin/clean_acc", "margin/not_converged", "margin/high_over_low", "margin/median/subspace_00"):
        assert steps(acc, tag) == val_step, tag  # exactly once, at the step of val/*
    assert "hp_metric" not in tags["scalars"]

    (layout_event,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(tensor_util.make_ndarray(layout_event.tensor_proto).item())
    (category,) = [c for c in layout.category if c.title == "margin"]
    charts = {chart.title: list(chart.multiline.tag) for chart in category.chart}
    assert charts["median margin per subspace (L2)"] == [r"margin/median/subspace_.*"]
    assert r"margin/high_over_low" in charts["low / high band medians, high_over_low"]
    median_tags = [t for t in tags["scalars"] if t.startswith("margin/median/subspace_")]
    assert len(median_tags) == num_subspaces

    saved = read_report(log_dir / "margins" / "epoch_000")
    assert saved.settings["chunk_rows"] == 64 and saved.extra["num_chunks"] == 1  # 4 samples x 9 subspaces
    low, high = band_medians(saved.margins)
    assert acc.Scalars("margin/high_over_low")[0].value == pytest.approx(high / low, rel=1e-5)
    assert acc.Scalars("margin/clean_acc")[0].value == pytest.approx(saved.extra["clean_accuracy"])
    assert acc.Scalars("margin/not_converged")[0].value == saved.stats["num_not_converged_total"]
    assert {"margin/distribution", "margin/evolution"} <= set(tags["images"])

    hp = hparams_plugin_data(log_dir)
    metrics = {m.name.tag for m in hp["_hparams_/experiment"].experiment.metric_infos}
    assert metrics == {"margin/high_over_low", "margin/clean_acc", "hparams/val_acc"}
    session = hp["_hparams_/session_start_info"].session_start_info.hparams
    assert session["model/net"].string_value == "lenet" and session["data/dataset"].string_value == "synthetic"
    assert session["data/transform"].string_value == "none" and session["margin/num_samples"].number_value == 4
    assert acc.Scalars("hparams/val_acc")[0].value == pytest.approx(acc.Scalars("val/acc")[0].value)


def test_fit_end_measures_a_model_stopped_early_once_and_only_if_not_measured(tmp_path):
    class StopAfterFirstValidation(L.Callback):  # what EarlyStopping does: stop after a validation
        def on_validation_end(self, trainer, pl_module):
            trainer.should_stop = True

    class StopMidEpoch(L.Callback):  # what max_time does: stop between two training batches
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.current_epoch == 1:
                trainer.should_stop = True

    early = fit(tmp_path / "early", MarginCallback(num_samples=3, max_iter=10, every_n_epochs=5), 4,
                [StopAfterFirstValidation()])  # fmt: skip
    acc = events(early.log_dir)
    assert steps(acc, "margin/median/subspace_00") == steps(acc, "val/acc") == [1]  # at fit end, val's step
    assert [p.name for p in (Path(early.log_dir) / "margins").iterdir()] == ["epoch_000"]

    mid = fit(tmp_path / "mid", MarginCallback(num_samples=3, max_iter=10, every_n_epochs=1), 4, [StopMidEpoch()])
    acc = events(mid.log_dir)  # Lightning validates the stopped model; the fit end does not measure it again
    assert mid.global_step == 3 and steps(acc, "val/acc") == steps(acc, "margin/median/subspace_00") == [1, 2]

    noval = fit(tmp_path / "noval", MarginCallback(num_samples=3, max_iter=10, every_n_epochs=1), 3,
                check_val_every_n_epoch=2)  # fmt: skip
    acc = events(noval.log_dir)  # the last epoch has no validation: the final weights are measured at fit end
    assert steps(acc, "val/acc") == [3] and steps(acc, "margin/median/subspace_00") == [3, 6]
    assert sorted(p.name for p in (Path(noval.log_dir) / "margins").iterdir()) == ["epoch_001", "epoch_002"]

    off = fit(tmp_path / "off", MarginCallback(num_samples=3, every_n_epochs=5, measure_at_fit_end=False), 1)
    assert not (Path(off.log_dir) / "margins").exists()


def test_history_image_and_resume_keep_every_measured_epoch(tmp_path):
    first = MarginCallback(num_samples=3, max_iter=10, every_n_epochs=1)
    trainer = fit(tmp_path, first, 1, schedule="constant")  # a longer resume keeps a constant schedule
    assert sorted(first.history) == [0] and len(first.history[0]) == len(trainer.datamodule.subspaces())
    ckpt = tmp_path / "one.ckpt"
    trainer.save_checkpoint(ckpt)
    saved_state = torch.load(ckpt, weights_only=False, map_location="cpu")["callbacks"][first.state_key]
    assert saved_state["history"] == first.history

    resumed = MarginCallback(num_samples=3, max_iter=10, every_n_epochs=1)
    L.seed_everything(0)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=2,
        accelerator="cpu",
        logger=TensorBoardLogger(tmp_path, name="run", version="resumed", default_hp_metric=False),
        callbacks=[resumed],
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
    )
    model = ClassifierModule(net="lenet", num_classes=2, image_shape=(1, 16, 16), lr=0.2, schedule="constant")
    trainer.fit(model, SyntheticDataModule(**SYNTHETIC), ckpt_path=ckpt)
    assert sorted(resumed.history) == [0, 1] and resumed.history[0] == first.history[0]
    images = events(trainer.log_dir).Images("margin/evolution")
    assert len(images) == 1 and images[0].width > images[0].height * 0.9  # one column per epoch + colour bar
    assert np.isfinite(np.array(resumed.history[1])).all()
