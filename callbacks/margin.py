"""Measure margins along the DCT subspaces during training (and validate / test runs); log them to TensorBoard.

TensorBoard view (rank 0, the first TensorBoardLogger of the trainer), all at the step Lightning uses for the
`val/*` metrics of the same validation (`fit_loop.epoch_loop._batches_that_stepped`):

- CUSTOM SCALARS, section "margin" (`margin_layout`, event tag `custom_scalars__config__`): one chart per
  quantity, so that an axis never mixes units: `margin/high_over_low` alone; `margin/band_median/low` and
  `.../high` together (L2); `margin/clean_acc` alone; `margin/not_converged` alone; then the per-subspace medians
  `margin/median/subspace_SS`, at most 6 consecutive subspaces per chart (`subspace_groups`: MNIST's 21 in 4).
- Scalars: `margin/median/subspace_SS` (median over the samples, converged or not, as summary.json's
  `median_margin_all`); `margin/band_median/low` and `.../high`: median over all samples of the `band_width`
  lowest / highest frequency subspaces (the definition of docs/RESULTS.md); `margin/high_over_low` = high / low;
  `margin/clean_acc`: accuracy of the clean predictions on the measured samples; `margin/not_converged`: number
  of (sample, subspace) rows where the estimator did not converge.
- Histograms `margin/histogram/low_band` and `.../high_band` (the samples of the two bands); images
  `margin/distribution` (the paper's plot, `plot_margins`, titled as the result folder's margins.png) and
  `margin/evolution` (median per subspace x measured epoch, `plot_margin_evolution`).
- HPARAMS: a curated set of run settings (`run_hparams`: dataset, net, transform, PGD eps / steps / projection,
  epochs, learning rate, batch size, seed, margin samples; no paths, no class names) as a session of the run,
  without an experiment summary: TensorBoard then builds the table from every run it sees, the settings that
  differ between runs first (five shown). Its metric columns are the run's scalars in name order, the first
  five shown: `compare/clean_acc`, `compare/high_over_low` and `compare/val_acc` (copies of `margin/clean_acc`,
  `margin/high_over_low` and the last `val/acc`, named to sort first). Configs set `default_hp_metric: false`:
  Lightning then writes no experiment summary of its own, which would replace this table.

Terminal (rank 0): a bar over the (sample, subspace) rows while measuring, then a summary (`summary_lines`).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure
from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
from tensorboard.plugins.custom_scalar import layout_pb2
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from common.errors import InputError
from frequency import DCTBlockSubspaces
from frequency.transforms import FILTERS
from margins import figure_to_array, plot_margins, select_indices, write_report
from margins.chunks import ChunkStore
from margins.evaluate import make_job, state_sha256
from margins.guard import Watchdog, remove_markers
from margins.plot import describe_run, plot_margin_evolution
from margins.results import MarginReport
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

SUBSPACES_PER_CHART = 6  # two runs measured once: 12 points, which a margin chart's axis holds (`margin_layout`)
# TensorBoard's Time Series shows an image in a box about 450 x 215 px (IMAGES: 350 px wide): a wide, short figure
# (inches x 100 dpi) with large text, long labels on two lines and fewer subspace numbers stays readable there
TENSORBOARD_FIGSIZE = (6.4, 3.05)
TENSORBOARD_FONTS = {"font.size": 13}


def subspace_groups(num_subspaces: int) -> list[np.ndarray]:
    """The subspaces, low to high frequency, in as few nearly equal runs of consecutive indices as hold at most
    `SUBSPACES_PER_CHART` each (MNIST's 21: 0-5, 6-10, 11-15, 16-20)."""
    count = max(1, -(-num_subspaces // SUBSPACES_PER_CHART))
    return [part for part in np.array_split(np.arange(num_subspaces), count) if part.size]


def frequency_word(part: np.ndarray, num_subspaces: int) -> str:
    """ "low", "middle" or "high": where the middle of `part` lies among the subspaces (in thirds)."""
    centre = (part[0] + part[-1]) / 2 / max(num_subspaces - 1, 1)
    return "low" if centre < 1 / 3 else "high" if centre > 2 / 3 else "middle"


def margin_layout(num_subspaces: int, band_width: int = 3) -> layout_pb2.Layout:
    """The custom-scalars layout: one chart per quantity (never two units on one axis), the per-subspace medians
    in charts of a few consecutive subspaces (`subspace_groups`).

    Every chart is a margin chart whose band is the value itself (lower = upper = value): TensorBoard's default
    "ignore outliers" scaling fits the axis to the 5-95% quantiles of a chart's values, which for two runs
    measured once leaves both points off the axis; in a margin chart each point counts three times, so the axis
    of a chart with up to 13 points (e.g. 6 subspaces of two runs measured once) holds them all; beyond that
    TensorBoard's usual trimming applies."""
    width = band_size(num_subspaces, band_width)
    bands = f"low band (subspaces 0-{width - 1}), high band ({num_subspaces - width}-{num_subspaces - 1})"
    charts = {
        "high-band / low-band median margin": ["margin/high_over_low"],
        f"median margin (L2): {bands}": ["margin/band_median/low", "margin/band_median/high"],
        "clean accuracy of the measured samples": ["margin/clean_acc"],
        "not-converged (sample, subspace) rows": ["margin/not_converged"],
    }
    tags = median_tags(num_subspaces)
    for part in subspace_groups(num_subspaces):
        where = frequency_word(part, num_subspaces)
        charts[f"median margin (L2), subspaces {part[0]}-{part[-1]} ({where} frequencies)"] = [tags[s] for s in part]
    # TensorBoard's dashboard lays out the margin charts of a category in reverse order: written last to first,
    # they read in the order above
    ordered = [_chart(title, series) for title, series in reversed(charts.items())]
    return layout_pb2.Layout(category=[layout_pb2.Category(title="margin", chart=ordered)])


def _chart(title: str, tags: list[str]) -> layout_pb2.Chart:
    series = [layout_pb2.MarginChartContent.Series(value=tag, lower=tag, upper=tag) for tag in tags]
    return layout_pb2.Chart(title=title, margin=layout_pb2.MarginChartContent(series=series))


def layout_summary(layout: layout_pb2.Layout) -> Summary:
    """The event summary TensorBoard reads a custom-scalars layout from (tag `custom_scalars__config__`)."""
    tensor = TensorProto(dtype="DT_STRING", string_val=[layout.SerializeToString()], tensor_shape=TensorShapeProto())
    metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="custom_scalars"))
    return Summary(value=[Summary.Value(tag="custom_scalars__config__", tensor=tensor, metadata=metadata)])


def median_tags(num_subspaces: int) -> list[str]:
    """The scalar tag of each subspace's median margin, in subspace order."""
    return [f"margin/median/subspace_{s:02d}" for s in range(num_subspaces)]


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
        progress: a progress bar on rank 0 while measuring (the summary after each measurement is always printed).
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
        self._layout_dir: str | None = None  # the log dir that has the layout and the HPARAMS session

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
        start = time.perf_counter()
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
                work.start_progress(pending, f"margins {run_label(run_name)}: (sample, subspace) rows")
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
            self._log_tensorboard(trainer, pl_module, logger, report, job.title, run_name, step)
        seconds = time.perf_counter() - start
        terminal_print(summary_lines(report, self.band_width, run_label(run_name), seconds, out_dir))
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
        title = f"{_describe(pl_module, datamodule)}, {run_label(run_name)}"
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
        report: MarginReport,
        title: str,
        run: str,
        step: int,
    ) -> None:
        writer, margins = logger.experiment, np.asarray(report.margins)
        first = self._layout_dir != logger.log_dir
        if first:  # the logger's own file writer (as Lightning's log_hyperparams uses it)
            writer._get_file_writer().add_summary(layout_summary(margin_layout(margins.shape[0], self.band_width)))
            self._layout_dir = logger.log_dir
        scalars = margin_scalars(report, self.band_width)
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, step)
        width = band_size(margins.shape[0], self.band_width)
        writer.add_histogram("margin/histogram/low_band", margins[:width], step)
        writer.add_histogram("margin/histogram/high_band", margins[-width:], step)
        if self.log_figure:
            self._log_figures(writer, report, title, _describe(pl_module, trainer.datamodule), step)
        if not run.startswith("test_"):
            self._log_hparams(trainer, pl_module, writer, scalars, first, step)
        writer.flush()

    def _log_figures(self, writer: Any, report: MarginReport, title: str, run: str, step: int) -> None:
        """The result folder's figure (its `title` and subtitle) and the history of the `run` ("lenet on mnist
        (transform none)"), drawn small with large text."""
        with matplotlib.rc_context(TENSORBOARD_FONTS):
            writer.add_image(
                "margin/distribution", figure_to_array(card_figure(report, title)), step, dataformats="HWC"
            )
            if self.history:
                epochs = sorted(self.history)
                table = np.array([self.history[e] for e in epochs]).T  # [S, E]
                evolution = card_evolution(epochs, table, run, np.asarray(report.margins).shape[1])
                writer.add_image("margin/evolution", figure_to_array(evolution), step, dataformats="HWC")

    def _log_hparams(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        writer: Any,
        scalars: dict[str, float],
        first: bool,
        step: int,
    ) -> None:
        """The HPARAMS session of the run (its settings, once per log dir) and its metric scalars at `step`:
        `compare/high_over_low`, `compare/clean_acc` and `compare/val_acc` (the last `val/acc`)."""
        if first:
            _, session_start, _ = hparams_summaries(run_hparams(trainer, pl_module, self.num_samples), {})
            writer._get_file_writer().add_summary(session_start)
        metrics = {f"compare/{name}": scalars[f"margin/{name}"] for name in ("high_over_low", "clean_acc")}
        val_acc = trainer.callback_metrics.get("val/acc")
        if val_acc is not None:
            metrics["compare/val_acc"] = float(val_acc)
        for tag, value in metrics.items():
            writer.add_scalar(tag, value, step)


def card_figure(report: MarginReport, title: str) -> Figure:
    """The paper's plot of `report` for a TensorBoard card: `plot_margins` with the title and subtitle of the
    result folder's margins.png, at `TENSORBOARD_FIGSIZE`, at most 6 subspace numbers (draw it under
    `TENSORBOARD_FONTS`)."""
    wrong = np.asarray(report.predicted) != np.asarray(report.targets)
    fig = Figure(figsize=TENSORBOARD_FIGSIZE, layout="constrained")
    ax = fig.add_subplot()
    plot_margins(report.margins, report.converged, title=title, misclassified=wrong, ax=ax)
    numbers = np.arange(np.asarray(report.margins).shape[0])
    every = max(2, -(-len(numbers) // 6))
    ax.set_xticks(numbers, [str(n) if n % every == 0 else "" for n in numbers], minor=True)
    return fig


def card_evolution(epochs: list[int], medians: np.ndarray, title: str, num_samples: int) -> Figure:
    """`plot_margin_evolution` for a TensorBoard card: `TENSORBOARD_FIGSIZE` (wider for many epochs), the long
    axis and colour-bar labels on two lines (draw it under `TENSORBOARD_FONTS`)."""
    fig = plot_margin_evolution(epochs, medians, title=title, num_samples=num_samples)
    fig.set_size_inches(max(TENSORBOARD_FIGSIZE[0], fig.get_figwidth()), TENSORBOARD_FIGSIZE[1])
    for ax in fig.axes:
        ax.set_ylabel(two_lines(ax.get_ylabel()))
    return fig


def two_lines(label: str) -> str:
    """A long label on two lines, broken after its first comma or before its first parenthesis."""
    head, comma, tail = label.partition(", ")
    if comma:
        return f"{head},\n{tail}"
    head, paren, tail = label.partition(" (")
    return f"{head}\n({tail}" if paren else label


def run_hparams(trainer: L.Trainer, pl_module: L.LightningModule, margin_samples: int) -> dict[str, Any]:
    """The settings the HPARAMS table compares: dataset, net, transform (and its bandwidth when it filters),
    PGD eps / steps / projection (0, 0, "none" for standard training), epochs, learning rate, batch size, the
    run's seed and the number of margin samples. Names sort as a reader scans them (TensorBoard lists the
    settings that differ first, then by name, and shows the first five)."""
    model, data = pl_module.hparams, getattr(trainer.datamodule, "hparams", {})
    adversarial = "eps" in model
    params = {
        "dataset": data.get("dataset", getattr(trainer.datamodule, "name", None)),
        "net": model.get("net"),
        "transform": data.get("transform", "none"),
        "transform/bandwidth": data.get("bandwidth") if data.get("transform") in FILTERS else None,
        "pgd/eps": float(model["eps"]) if adversarial else 0.0,
        "pgd/steps": int(model["attack_steps"]) if adversarial else 0,
        "pgd/projection": str(model.get("projection")) if adversarial else "none",
        "train/epochs": trainer.max_epochs,
        "train/lr": model.get("lr"),
        "train/batch_size": data.get("batch_size"),
        "train/seed": int(os.environ["PL_GLOBAL_SEED"]) if "PL_GLOBAL_SEED" in os.environ else None,
        "margin/samples": margin_samples,
    }
    return {k: v for k, v in params.items() if isinstance(v, (bool, int, float, str))}


def log_step(trainer: L.Trainer) -> int:
    """The step Lightning 2.6 gives `self.log` epoch-level metrics (`LoggerConnector.log_metrics`): the count of
    optimizer-stepped batches BEFORE the current one's increment, i.e. `global_step - 1` at the end-of-epoch
    validation of a fit, 0 in a fresh `validate` / `test` run."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def band_size(num_subspaces: int, width: int = 3) -> int:
    """Subspaces in each band: `width` capped at half the subspaces (at least 1), so the bands never overlap."""
    return max(1, min(width, num_subspaces // 2))


def band_medians(margins: np.ndarray, width: int = 3) -> tuple[float, float]:
    """Median over all samples of the `width` lowest and of the `width` highest frequency subspaces of
    `margins: [S, N]` (width capped at S // 2, at least 1, so the bands never overlap when S >= 2)."""
    width = band_size(margins.shape[0], width)
    return float(np.median(margins[:width])), float(np.median(margins[-width:]))


def margin_scalars(report: MarginReport, band_width: int = 3) -> dict[str, float]:
    """The scalars of one measurement by tag: per-subspace medians (as summary.json's `median_margin_all`), band
    medians and their ratio, clean accuracy, not-converged rows."""
    margins = np.asarray(report.margins)
    low, high = band_medians(margins, band_width)
    medians = np.median(margins, axis=1)
    return {
        **{tag: float(m) for tag, m in zip(median_tags(margins.shape[0]), medians)},
        "margin/band_median/low": low,
        "margin/band_median/high": high,
        "margin/high_over_low": high / low if low > 0 else float("nan"),
        "margin/clean_acc": accuracy(report),
        "margin/not_converged": float((~np.asarray(report.converged)).sum()),
    }


def accuracy(report: MarginReport) -> float:
    """Accuracy of the clean predictions on the measured samples."""
    return float(np.mean(np.asarray(report.predicted) == np.asarray(report.targets)))


def run_label(run_name: str) -> str:
    """ "epoch 3" for the folder `epoch_003`, "test, epoch 0" for `test_epoch_000` (others unchanged)."""
    stage, _, number = run_name.rpartition("_")
    if not number.isdigit() or not stage.endswith("epoch"):
        return run_name
    prefix = stage.removesuffix("epoch").strip("_").replace("_", " ")
    return f"{prefix + ', ' if prefix else ''}epoch {int(number)}"


def summary_lines(report: MarginReport, band_width: int, label: str, seconds: float, folder: Path) -> list[str]:
    """The terminal block after a measurement: band medians and their ratio, clean accuracy, not-converged rows,
    seconds and the result folder."""
    margins = np.asarray(report.margins)
    num_subspaces, num_samples = margins.shape
    width = band_size(num_subspaces, band_width)
    low, high = band_medians(margins, band_width)
    ratio = f"{high / low:.3g}" if low > 0 else "n/a (low-band median 0)"
    missed = int((~np.asarray(report.converged)).sum())
    return [
        f"margins {label}: {num_samples} samples x {num_subspaces} subspaces in {seconds:.1f} s -> {folder}",
        f"  median margin (L2): low band (subspaces 0-{width - 1}) {low:.3g}, high band "
        f"({num_subspaces - width}-{num_subspaces - 1}) {high:.3g}, high/low {ratio}",
        f"  clean accuracy {accuracy(report):.1%}, not converged {missed} of {margins.size} rows",
    ]


def terminal_print(lines: list[str]) -> None:
    """Print `lines` to stdout above the progress bars on the terminal (Lightning's and the margin bar: tqdm
    clears them, prints, draws them again), so that no bar is cut by the text."""
    from tqdm.auto import tqdm

    tqdm.write("\n".join(lines), file=sys.stdout)
    sys.stdout.flush()


def _public(hparams: Any) -> dict[str, Any]:
    """hparams without private keys (LightningCLI adds `_instantiator`)."""
    return {k: v for k, v in dict(hparams).items() if not str(k).startswith("_")}


def _describe(pl_module: L.LightningModule, datamodule: Any) -> str:
    """ "lenet on mnist (transform none)" from the hparams (class names as fallback)."""
    hp = getattr(datamodule, "hparams", {})
    net = pl_module.hparams.get("net", type(pl_module).__name__)
    return describe_run(net, hp.get("dataset", type(datamodule).__name__), hp.get("transform", "none"))


def _tensorboard_logger(trainer: L.Trainer) -> TensorBoardLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


__all__ = [
    "MarginCallback",
    "band_medians",
    "log_step",
    "margin_layout",
    "median_tags",
    "run_hparams",
    "run_label",
    "subspace_groups",
    "summary_lines",
]
