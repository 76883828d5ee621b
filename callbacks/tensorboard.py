"""What `MarginCallback` shows in TensorBoard (rank 0, the first TensorBoardLogger of the trainer), all at the step
Lightning uses for the `val/*` metrics of the same validation (`log_step`):

- CUSTOM SCALARS, section "margin" (`margin_layout`, event tag `custom_scalars__config__`): one chart per
  quantity, so that an axis never mixes units: `margin/high_over_low` alone; `margin/band_median/low` and
  `.../high` together (L2); `margin/clean_acc` alone; `margin/not_converged` alone; then the per-subspace medians
  `margin/median/subspace_SS`, at most 6 consecutive subspaces per chart (`subspace_groups`: MNIST's 21 in 4).
- Scalars (`margin_scalars`): `margin/median/subspace_SS` (median over the samples, converged or not, as
  summary.json's `median_margin_all`); `margin/band_median/low` and `.../high`: median over all samples of the
  `band_width` lowest / highest frequency subspaces (the definition of docs/RESULTS.md); `margin/high_over_low` =
  high / low; `margin/clean_acc`: accuracy of the clean predictions on the measured samples; `margin/not_converged`:
  number of (sample, subspace) rows where the estimator did not converge.
- Histograms `margin/histogram/low_band` and `.../high_band` (the samples of the two bands); images
  `margin/distribution` (the paper's plot, `card_figure`, titled as the result folder's margins.png) and
  `margin/evolution` (median per subspace x measured epoch, `card_evolution`).
- HPARAMS: a curated set of run settings (`run_hparams`: dataset, net, transform, PGD eps / steps / projection,
  epochs, learning rate, batch size, seed, margin samples; no paths, no class names) as a session of the run,
  without an experiment summary: TensorBoard then builds the table from every run it sees, the settings that
  differ between runs first (five shown). Its metric columns are the run's scalars in name order, the first
  five shown: `compare/clean_acc`, `compare/high_over_low` and `compare/val_acc` (copies of `margin/clean_acc`,
  `margin/high_over_low` and the last `val/acc`, named to sort first). Configs set `default_hp_metric: false`:
  Lightning then writes no experiment summary of its own, which would replace this table.

Rank 0 only: nothing here runs a collective.
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import matplotlib
import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure
from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
from tensorboard.plugins.custom_scalar import layout_pb2
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from frequency.transforms import FILTERS
from margins import figure_to_array, plot_margins
from margins.plot import describe_run, plot_margin_evolution
from margins.results import MarginReport

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


def log_measurement(
    logger: TensorBoardLogger,
    trainer: L.Trainer,
    pl_module: L.LightningModule,
    report: MarginReport,
    title: str,
    run: str,
    step: int,
    *,
    first: bool,
    band_width: int,
    num_samples: int,
    history: dict[int, list[float]] | None,
) -> None:
    """Log one measurement at `step`: the layout and the HPARAMS session when `first` in this log dir, the scalars,
    the two band histograms, the card images when `history` is given (the median history, epoch -> [S]), and the
    HPARAMS metrics unless `run` is a test run."""
    writer, margins = logger.experiment, np.asarray(report.margins)
    if first:  # the logger's own file writer (as Lightning's log_hyperparams uses it)
        writer._get_file_writer().add_summary(layout_summary(margin_layout(margins.shape[0], band_width)))
    scalars = margin_scalars(report, band_width)
    for tag, value in scalars.items():
        writer.add_scalar(tag, value, step)
    width = band_size(margins.shape[0], band_width)
    writer.add_histogram("margin/histogram/low_band", margins[:width], step)
    writer.add_histogram("margin/histogram/high_band", margins[-width:], step)
    if history is not None:
        log_figures(writer, report, title, describe_module(pl_module, trainer.datamodule), step, history)
    if not run.startswith("test_"):
        log_hparams(trainer, pl_module, writer, scalars, first, step, num_samples)
    writer.flush()


def log_figures(
    writer: Any, report: MarginReport, title: str, run: str, step: int, history: dict[int, list[float]]
) -> None:
    """The result folder's figure (its `title` and subtitle) and the `history` of the `run` ("lenet on mnist
    (transform none)"), drawn small with large text."""
    with matplotlib.rc_context(TENSORBOARD_FONTS):
        writer.add_image("margin/distribution", figure_to_array(card_figure(report, title)), step, dataformats="HWC")
        if history:
            epochs = sorted(history)
            table = np.array([history[e] for e in epochs]).T  # [S, E]
            evolution = card_evolution(epochs, table, run, np.asarray(report.margins).shape[1])
            writer.add_image("margin/evolution", figure_to_array(evolution), step, dataformats="HWC")


def log_hparams(
    trainer: L.Trainer,
    pl_module: L.LightningModule,
    writer: Any,
    scalars: dict[str, float],
    first: bool,
    step: int,
    num_samples: int,
) -> None:
    """The HPARAMS session of the run (its settings, once per log dir) and its metric scalars at `step`:
    `compare/high_over_low`, `compare/clean_acc` and `compare/val_acc` (the last `val/acc`)."""
    if first:
        _, session_start, _ = hparams_summaries(run_hparams(trainer, pl_module, num_samples), {})
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


def describe_module(pl_module: L.LightningModule, datamodule: Any) -> str:
    """ "lenet on mnist (transform none)" from the hparams (class names as fallback)."""
    hp = getattr(datamodule, "hparams", {})
    net = pl_module.hparams.get("net", type(pl_module).__name__)
    return describe_run(net, hp.get("dataset", type(datamodule).__name__), hp.get("transform", "none"))


def tensorboard_logger(trainer: L.Trainer) -> TensorBoardLogger | None:
    """The trainer's first TensorBoardLogger, if any."""
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
