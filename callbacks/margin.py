"""Measure margins along the DCT subspaces during training (and validate / test runs); log them to TensorBoard.

TensorBoard view (rank 0, the first TensorBoardLogger of the trainer), all at the step Lightning uses for the
`val/*` metrics of the same validation (`fit_loop.epoch_loop._batches_that_stepped`):

- CUSTOM SCALARS, section "margin" (layout `MARGIN_LAYOUT`, event tag `custom_scalars__config__`): one chart
  with every `margin/median/subspace_SS`, one with the low/high band medians and `margin/high_over_low`, one
  with `margin/clean_acc` and `margin/not_converged`.
- Scalars: `margin/median/subspace_SS` (median over the samples, converged or not, as summary.json's
  `median_margin_all`); `margin/band_median/low` and `.../high`: median over all samples of the `band_width`
  lowest / highest frequency subspaces (the definition of docs/RESULTS.md); `margin/high_over_low` = high / low;
  `margin/clean_acc`: accuracy of the clean predictions on the measured samples; `margin/not_converged`: number
  of (sample, subspace) rows where DeepFool hit max_iter.
- Histograms `margin/subspace_SS`; images `margin/distribution` (the paper's plot, `plot_margins`) and
  `margin/evolution` (median per subspace x measured epoch, `plot_margin_evolution`).
- HPARAMS: model, data and margin settings, with metrics `hparams/val_acc` (the last `val/acc`),
  `margin/high_over_low` and `margin/clean_acc`. Configs set `default_hp_metric: false` (no `hp_metric = -1`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from common.errors import InputError
from frequency import DCTBlockSubspaces
from margins import figure_to_array, plot_margins, select_indices, write_report
from margins.chunks import ChunkStore
from margins.evaluate import make_job, state_sha256
from margins.guard import Watchdog, remove_markers
from margins.plot import plot_margin_evolution
from margins.sharding import chunk_ranges, shard_range
from margins.work import (
    CHUNK_DIR,
    AttackSettings,
    ChunkWork,
    MarginJob,
    RunSettings,
    merge_chunks,
    record_device,
    wait_for_chunks,
)

MARGIN_LAYOUT = {
    "margin": {
        "median margin per subspace (L2)": ["Multiline", [r"margin/median/subspace_.*"]],
        "low / high band medians, high_over_low": ["Multiline", [r"margin/band_median/.*", r"margin/high_over_low"]],
        "clean accuracy and not-converged rows": ["Multiline", [r"margin/clean_acc", r"margin/not_converged"]],
    }
}


class MarginCallback(L.Callback):
    """Runs batched subspace DeepFool on a fixed evaluation subset at the end of validation / test epochs.

    Args:
        num_samples: samples of `datamodule.margin_dataset()` (the test split) to measure; the same ones every time.
        seed: seed choosing those samples.
        every_n_epochs: measure every N validation epochs during `fit` (always in `validate` / `test` runs).
        measure_at_fit_end: also measure the final model when `fit` ends (last epoch, EarlyStopping, max_time),
            unless the last validation already measured it.
        on_test: also measure at the end of `test` runs.
        subspace_dim, subspace_step: DCT block side and step (default: the datamodule's, the paper's settings).
        max_iter, overshoot: DeepFool settings (release: 100, 0.02).
        estimator: "deepfool" (the paper's) or "fmn" (minimum-norm, `attacks.fmn`, `fmn_steps` steps per row).
        chunk_rows: (sample, subspace) rows per chunk, attacked as one batch: the unit shared out under DDP.
        threads: CPU threads while measuring (float bits depend on them: pinned, so 1 and k processes agree).
        kernels: the engine's kernels, "auto" or "off" (`attacks.kernels`).
        band_width: subspaces in the low and in the high band (capped at half the subspaces).
        log_figure: log the paper's plot `margin/distribution` and the history image `margin/evolution`.
        progress: a progress bar on rank 0 while measuring.
        enabled: False turns the callback off (`--margin.enabled false`).

    The measurement runs the chunk work of `evaluate_margin.py` (`margins.work.ChunkWork`): the rows are cut into
    chunks of `chunk_rows` sample-major rows, each rank attacks its contiguous share of the pending chunks (each
    chunk alone, with only its own samples) and commits them to `<log_dir>/margins/<run>/chunks/`, and rank 0
    merges them into the same result files, so results are bit-identical for any number of processes and equal
    `evaluate_margin.py` on the same weights. The margins are computed in float32 whatever the trainer's precision
    (mixed-precision autocast is switched off around the attack). Only rank 0 writes the report and logs to
    TensorBoard. The median history (`margin/evolution`) is part of `state_dict`, so a resumed run keeps it.
    """

    def __init__(
        self,
        num_samples: int = 100,
        seed: int = 0,
        every_n_epochs: int = 1,
        measure_at_fit_end: bool = True,
        on_test: bool = True,
        subspace_dim: int | None = None,
        subspace_step: int | None = None,
        max_iter: int = 100,
        overshoot: float = 0.02,
        chunk_rows: int = 512,
        estimator: str = "deepfool",
        fmn_steps: int = 200,
        threads: int = 1,
        kernels: str = "auto",
        band_width: int = 3,
        log_figure: bool = True,
        progress: bool = True,
        enabled: bool = True,
    ):
        for name, value in (("num_samples", num_samples), ("every_n_epochs", every_n_epochs),
                            ("band_width", band_width), ("threads", threads)):  # fmt: skip
            if value < 1:
                raise InputError(f"margin.{name} must be >= 1, got {value} (--margin.{name})")
        self.num_samples, self.seed, self.every_n_epochs, self.on_test = num_samples, seed, every_n_epochs, on_test
        self.measure_at_fit_end, self.band_width = measure_at_fit_end, band_width
        self.subspace_dim, self.subspace_step = subspace_dim, subspace_step
        self.attack = AttackSettings(overshoot=overshoot, max_iter=max_iter, chunk_rows=chunk_rows, kernels=kernels,
                                     estimator=estimator, fmn_steps=fmn_steps)  # fmt: skip
        self.attack.check()
        self.threads, self.log_figure, self.progress, self.enabled = threads, log_figure, progress, enabled
        self.history: dict[int, list[float]] = {}  # epoch -> median margin per subspace
        self._reset_fit_state()

    def _reset_fit_state(self) -> None:
        self._train_epoch = 0
        self._last_val: tuple[int, int, int] | None = None  # (global_step, epoch, log step) of the last validation
        self._measured_global_step: int | None = None
        self._layout_dir: str | None = None

    # ---- state -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"history": {int(e): list(m) for e, m in self.history.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {int(e): [float(v) for v in m] for e, m in state_dict.get("history", {}).items()}

    # ---- hooks -------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset_fit_state()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._train_epoch = trainer.current_epoch

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self.enabled:
            return
        epoch, step = trainer.current_epoch, log_step(trainer)
        if trainer.state.fn != "fit":
            self.measure(trainer, pl_module, f"epoch_{epoch:03d}", step, epoch)
            return
        self._last_val = (trainer.global_step, epoch, step)
        if (epoch + 1) % self.every_n_epochs == 0:
            self._measured_global_step = trainer.global_step
            self.measure(trainer, pl_module, f"epoch_{epoch:03d}", step, epoch)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Measure the final model, at the step and epoch of the last validation if it saw these weights.
        The decision depends only on state shared by all ranks, so every rank enters `measure` or none does."""
        if not (self.enabled and self.measure_at_fit_end) or self._measured_global_step == trainer.global_step:
            return
        if self._last_val is not None and self._last_val[0] == trainer.global_step:
            _, epoch, step = self._last_val
        else:
            epoch, step = self._train_epoch, log_step(trainer)
        self._measured_global_step = trainer.global_step
        self.measure(trainer, pl_module, f"epoch_{epoch:03d}", step, epoch)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.on_test and self.enabled:
            epoch = trainer.current_epoch
            self.measure(trainer, pl_module, f"test_epoch_{epoch:03d}", log_step(trainer), None, epoch)

    # ---- work --------------------------------------------------------------------------------------------
    def measure(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        run_name: str,
        step: int | None = None,
        epoch: int | None = None,
        folder_epoch: int | None = None,
    ) -> Path | None:
        """Measure on every rank (each its share of the chunks), merge, write and log on rank 0 at `step` (default:
        the current Lightning log step); `epoch` given: record the medians in the history. Must be called on every
        rank. Returns the output dir on rank 0."""
        step = log_step(trainer) if step is None else step
        out_dir = Path(trainer.log_dir or trainer.default_root_dir) / "margins" / run_name  # a broadcast: all ranks
        job = self._job(trainer, pl_module, out_dir, run_name, epoch if epoch is not None else folder_epoch)
        device = pl_module.device
        record_device(job, device.type, self.threads)
        store = ChunkStore(out_dir / CHUNK_DIR)
        chunks = chunk_ranges(len(job.indices) * len(job.subspaces), self.attack.chunk_rows)
        run = RunSettings(threads=self.threads, progress=self.progress and trainer.is_global_zero)
        work = ChunkWork(job, self.attack, run, store, chunks)
        rank = trainer.global_rank
        with torch.inference_mode(False), work.process(device), Watchdog(store.root, rank, trainer.world_size) as dog:
            pending = trainer.strategy.broadcast(self._pending(work) if trainer.is_global_zero else None, src=0)
            mine = [pending[i] for i in shard_range(len(pending), rank, trainer.world_size)]
            if trainer.is_global_zero:
                work.start_progress(pending, f"margins {run_name}")
            try:
                for batch in work.loader(mine, device):
                    work.commit(work.attack(batch, device), rank)
            finally:
                work.close_progress()
            dog.done()
            if not trainer.is_global_zero:
                return None  # no collective: this rank goes on training, rank 0 merges what every rank committed
            wait_for_chunks(store, chunks, work.fingerprint)
        remove_markers(store.root)
        report = merge_chunks(job, store, chunks)
        if epoch is not None:
            self.history[epoch] = np.median(report.margins, axis=1).tolist()
        write_report(out_dir, report, title=job.title)
        logger = _tensorboard_logger(trainer)
        if logger is not None:
            wrong = report.predicted != report.targets
            self._log_tensorboard(trainer, pl_module, logger, report.margins, report.converged, wrong, run_name, step)
        return out_dir

    def _job(
        self, trainer: L.Trainer, pl_module: L.LightningModule, out_dir: Path, run_name: str, epoch: int | None
    ) -> MarginJob:
        datamodule = trainer.datamodule
        dataset = datamodule.margin_dataset()
        indices = select_indices(len(dataset), min(self.num_samples, len(dataset)), self.seed)
        subspaces = DCTBlockSubspaces(
            datamodule.image_shape,
            self.subspace_dim or datamodule.subspace_block,
            self.subspace_step or datamodule.subspace_step,
        )
        model = pl_module.model
        settings = {
            "source": "MarginCallback",
            "run": run_name,
            "epoch": epoch,
            "global_step": trainer.global_step,
            "world_size": trainer.world_size,
            "trainer_precision": str(trainer.precision),
            "model": _public(pl_module.hparams),
            "data": _public(datamodule.hparams),
            "checkpoint_sha256": state_sha256(model),
            "dataset": getattr(datamodule, "name", type(datamodule).__name__),
            "transform": datamodule.hparams.get("transform", "none"),
            "seed": self.seed,
        }
        title = _describe(pl_module, datamodule)
        return make_job(model, dataset, indices, subspaces, out_dir, self.attack, settings, title)

    def _pending(self, work: ChunkWork) -> list[int]:
        """Rank 0: the chunk ids still to attack; a folder left by other weights or settings starts again."""
        manifest = work.store.read_manifest()
        if manifest is not None and manifest.get("fingerprint") != work.job.fingerprint:
            print(f"note: {work.job.output_dir} held another measurement; measuring again", file=sys.stderr)
            work.store.reset()
        return work.prepare_folder()

    # ---- TensorBoard (rank 0 only: no collectives below) -------------------------------------------------
    def _log_tensorboard(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        logger: TensorBoardLogger,
        margins: np.ndarray,
        converged: np.ndarray,
        misclassified: np.ndarray,
        run: str,
        step: int,
    ) -> None:
        writer = logger.experiment
        if self._layout_dir != logger.log_dir:
            writer.add_custom_scalars(MARGIN_LAYOUT)
            self._layout_dir = logger.log_dir
        values = margins
        medians = np.median(values, axis=1)  # the same medians as summary.json's median_margin_all
        low, high = band_medians(values, self.band_width)
        for s in range(values.shape[0]):
            writer.add_scalar(f"margin/median/subspace_{s:02d}", float(medians[s]), step)
            writer.add_histogram(f"margin/subspace_{s:02d}", values[s], step)
        writer.add_scalar("margin/band_median/low", low, step)
        writer.add_scalar("margin/band_median/high", high, step)
        writer.add_scalar("margin/not_converged", int((~converged).sum()), step)
        if self.log_figure:
            self._log_figures(writer, pl_module, trainer, values, converged, misclassified, run, step)
        metrics = {"margin/high_over_low": high / low if low > 0 else float("nan")}
        metrics["margin/clean_acc"] = float(1.0 - misclassified.mean())
        if run.startswith("test_"):
            logger.log_metrics(metrics, step)
        else:  # the HPARAMS tab: settings + these metrics (log_hyperparams also logs them as scalars at `step`)
            val_acc = trainer.callback_metrics.get("val/acc")
            if val_acc is not None:
                metrics["hparams/val_acc"] = float(val_acc)
            logger.log_hyperparams(self._hparams(trainer, pl_module), metrics=metrics, step=step)
        writer.flush()

    def _log_figures(self, writer, pl_module, trainer, margins, converged, misclassified, run, step) -> None:
        stage, epoch = run.rsplit("_", 1)
        subtitle = f"{stage.replace('_', ' ')} {int(epoch)}, {margins.shape[1]} samples"
        title = _describe(pl_module, trainer.datamodule)
        figure = plot_margins(margins, converged, title=title, misclassified=misclassified, subtitle=subtitle)
        writer.add_image("margin/distribution", figure_to_array(figure), step, dataformats="HWC")
        if self.history:
            epochs = sorted(self.history)
            table = np.array([self.history[e] for e in epochs]).T  # [S, E]
            evolution = plot_margin_evolution(epochs, table, title=f"{title}\nmedian margin per subspace")
            writer.add_image("margin/evolution", figure_to_array(evolution), step, dataformats="HWC")

    def _hparams(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """Run settings for the HPARAMS tab (flattened by the logger to `model/...`, `data/...`, `margin/...`)."""
        margin = {
            "num_samples": self.num_samples,
            "seed": self.seed,
            "every_n_epochs": self.every_n_epochs,
            "max_iter": self.attack.max_iter,
            "overshoot": self.attack.overshoot,
            "subspace_dim": self.subspace_dim or trainer.datamodule.subspace_block,
            "subspace_step": self.subspace_step or trainer.datamodule.subspace_step,
            "band_width": self.band_width,
        }
        model = {"class": type(pl_module).__name__, **_public(pl_module.hparams)}
        data = {"class": type(trainer.datamodule).__name__, **_public(trainer.datamodule.hparams)}
        return {"model": model, "data": data, "margin": margin}


def log_step(trainer: L.Trainer) -> int:
    """The step Lightning 2.6 gives `self.log` epoch-level metrics (`LoggerConnector.log_metrics`): the count of
    optimizer-stepped batches BEFORE the current one's increment, i.e. `global_step - 1` at the end-of-epoch
    validation of a fit, 0 in a fresh `validate` / `test` run."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def band_medians(margins: np.ndarray, width: int = 3) -> tuple[float, float]:
    """Median over all samples of the `width` lowest and of the `width` highest frequency subspaces of
    `margins: [S, N]` (width capped at S // 2, at least 1, so the bands never overlap when S >= 2)."""
    width = max(1, min(width, margins.shape[0] // 2))
    return float(np.median(margins[:width])), float(np.median(margins[-width:]))


def _public(hparams: Any) -> dict[str, Any]:
    """hparams without private keys (LightningCLI adds `_instantiator`)."""
    return {k: v for k, v in dict(hparams).items() if not str(k).startswith("_")}


def _describe(pl_module: L.LightningModule, datamodule: Any) -> str:
    """ "lenet on mnist (transform none)" from the hparams (class names as fallback)."""
    net = pl_module.hparams.get("net", type(pl_module).__name__)
    hp = getattr(datamodule, "hparams", {})
    dataset = hp.get("dataset", type(datamodule).__name__)
    return f"{net} on {dataset} (transform {hp.get('transform', 'none')})"


def _tensorboard_logger(trainer: L.Trainer) -> TensorBoardLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


__all__ = ["MARGIN_LAYOUT", "MarginCallback", "band_medians", "log_step"]
