"""What `MarginCallback` shows in TensorBoard (rank 0, the first TensorBoardLogger of the trainer), all at the step
Lightning uses for the `val/*` metrics of the same validation (`log_step`), every chart readable without hovering:

- Scalars (`margin_scalars`): `margin/median/subspace_SS` (median over the samples, converged or not, as
  summary.json's `median_margin_all`); `margin/band_median/low` and `.../high`: median over all samples of the
  `band_width` lowest / highest frequency subspaces (the definition of docs/RESULTS.md); `margin/high_over_low` =
  high / low; `margin/clean_acc`: accuracy of the clean predictions on the measured samples; `margin/not_converged`:
  number of (sample, subspace) rows where the estimator did not converge.
- Profiles: `margin/profile/<run>` (`profile_tag`, `<run>` the result folder's name, e.g. `epoch_004`), one tag per
  measurement whose step is the subspace index: the median margin of subspace s at step s, so that a chart's x axis
  names the subspace (one line per TensorBoard run).
- `compare/clean_acc`, `compare/high_band_share` (high / (low + high), the ratio on a 0-1 scale) and
  `compare/val_acc` (the last `val/acc`): fractions only (`log_hparams`), so that the Scalars tab, whose axis falls
  back to 0-1 when its "ignore outliers" leaves no value (two runs measured once), shows every run.
- CUSTOM SCALARS, section "margin" (`margin_layout`, event tag `custom_scalars__config__`, written again with each
  measurement): one chart per quantity, so that an axis never mixes units: `margin/high_over_low` alone;
  `margin/band_median/low` and `.../high` together (L2); `margin/clean_acc` alone; `margin/not_converged` alone; then
  one profile chart per measurement, titled with its epoch and what x is.
- Histograms `margin/histogram/low_band` and `.../high_band` (the samples of the two bands); images
  `margin/distribution` (the paper's plot, `card_figure`, titled as the result folder's margins.png) and
  `margin/evolution` (median per subspace x measured epoch, `card_evolution`), every text inside the image.
- HPARAMS: a curated set of run settings (`run_hparams`: dataset, net, transform, PGD eps / steps / projection,
  epochs, learning rate, batch size, seed, margin samples; no paths, no class names) as a session of the run,
  without an experiment summary: TensorBoard then builds the table from every run it sees, the settings that
  differ between runs first (five shown). Its metric columns are the run's scalars in name order, the first
  five shown: the three `compare/*`, then `margin/band_median/high` and `.../low`. Configs set
  `default_hp_metric: false`: Lightning then writes no experiment summary of its own, which would replace this table.

docs/TENSORBOARD.md says what each tab shows and why. Rank 0 only: nothing here runs a collective.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import matplotlib
import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import RendererAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
from tensorboard.plugins.custom_scalar import layout_pb2
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from frequency.transforms import FILTERS
from margins.store.names import estimator_of
from margins.store.results import MarginReport
from plotting.margins import describe_run, figure_to_array, plot_margin_evolution, plot_margins

# TensorBoard's Time Series shows an image in a box about 450 x 215 px (IMAGES: 350 px wide): a wide, short figure
# (inches x 100 dpi) with large text, long labels on two lines and fewer subspace numbers stays readable there
TENSORBOARD_FIGSIZE = (6.4, 3.05)
TENSORBOARD_FONTS = {"font.size": 13}


def margin_layout(num_subspaces: int, band_width: int = 3, profiles: dict[str, str] | None = None) -> layout_pb2.Layout:
    """The custom-scalars layout: one chart per quantity (never two units on one axis), then one chart per
    measurement in `profiles` (run name -> label, e.g. "epoch_004" -> "epoch 4"): the median margin of each
    subspace along x (`profile_tag`), one line per TensorBoard run.

    Every chart is a margin chart whose band is the value itself (lower = upper = value): margin charts are drawn
    unsmoothed, and TensorBoard's default "ignore outliers" scaling, which keeps the values between the 5% and 95%
    quantiles of a chart, holds every point of a chart with up to 13 points when each counts three times (two runs
    measured once: both on the axis); a profile's extremes may be trimmed as in any chart."""
    width = band_size(num_subspaces, band_width)
    bands = f"low band (subspaces 0-{width - 1}), high band ({num_subspaces - width}-{num_subspaces - 1})"
    charts = {
        "high-band / low-band median margin": ["margin/high_over_low"],
        f"median margin (L2): {bands}": ["margin/band_median/low", "margin/band_median/high"],
        "clean accuracy of the measured samples": ["margin/clean_acc"],
        "not-converged (sample, subspace) rows": ["margin/not_converged"],
    }
    for run, label in (profiles or {}).items():
        charts[profile_title(label, num_subspaces)] = [profile_tag(run)]
    # TensorBoard's dashboard lays out the margin charts of a category in reverse order: written last to first,
    # they read in the order above
    ordered = [_chart(title, series) for title, series in reversed(charts.items())]
    return layout_pb2.Layout(category=[layout_pb2.Category(title="margin", chart=ordered)])


def profile_tag(run: str) -> str:
    """The scalar tag of one measurement's profile (`run`: its result folder's name, e.g. "epoch_004"): the median
    margin of subspace s at step s."""
    return f"margin/profile/{run}"


def profile_title(label: str, num_subspaces: int) -> str:
    """The title of a profile chart: what x is, since TensorBoard labels it only "step"."""
    return f"median margin (L2) per subspace, {label}: x = subspace 0-{num_subspaces - 1}, low → high frequency"


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


@dataclass
class BoardState:
    """What rank 0 has written to a log dir: the log dir (None: none yet) and its measurements (run name -> label),
    in the order measured. A new log dir gets the HPARAMS session once and a layout naming its profiles."""

    log_dir: str | None = None
    profiles: dict[str, str] = field(default_factory=dict)


def log_measurement(
    logger: TensorBoardLogger,
    trainer: L.Trainer,
    pl_module: L.LightningModule,
    report: MarginReport,
    title: str,
    run: str,
    label: str,
    step: int,
    *,
    state: BoardState,
    band_width: int,
    num_samples: int,
    history: dict[int, list[float]] | None,
) -> None:
    """Log one measurement (`run`: its result folder's name, `label`: "epoch 4") at `step`: the scalars and its
    profile, the two band histograms, the card images when `history` is given (the median history, epoch -> [S]),
    the HPARAMS metrics unless `run` is a test run (the session too in a new log dir), and the layout with every
    profile of the log dir. Updates `state`."""
    writer, margins = logger.experiment, np.asarray(report.margins)
    first = state.log_dir != logger.log_dir
    if first:
        state.log_dir, state.profiles = logger.log_dir, {}
    scalars = margin_scalars(report, band_width)
    for tag, value in scalars.items():
        writer.add_scalar(tag, value, step)
    for subspace, median in enumerate(np.median(margins, axis=1)):
        writer.add_scalar(profile_tag(run), float(median), subspace)
    width = band_size(margins.shape[0], band_width)
    writer.add_histogram("margin/histogram/low_band", margins[:width], step)
    writer.add_histogram("margin/histogram/high_band", margins[-width:], step)
    if history is not None:
        log_figures(writer, report, title, describe_module(pl_module, trainer.datamodule), step, history)
    if not run.startswith("test_"):
        log_hparams(trainer, pl_module, writer, scalars, first, step, num_samples)
    state.profiles[run] = label
    # the logger's own file writer (as Lightning's log_hyperparams uses it); TensorBoard reads a run's last layout
    layout = layout_summary(margin_layout(margins.shape[0], band_width, state.profiles))
    writer._get_file_writer().add_summary(layout, len(state.profiles))
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
    """The HPARAMS session of the run (its settings, `first` in a log dir) and its metric scalars at `step`,: fractions
    in [0, 1] only (`compare/clean_acc`, `compare/high_band_share`, `compare/val_acc`: the last `val/acc`), so that
    TensorBoard's Scalars tab, whose axis falls back to 0-1 when "ignore outliers" leaves no value (two runs
    measured once), still shows every run."""
    if first:
        _, session_start, _ = hparams_summaries(run_hparams(trainer, pl_module, num_samples), {})
        writer._get_file_writer().add_summary(session_start)
    low, high = scalars["margin/band_median/low"], scalars["margin/band_median/high"]
    metrics = {"compare/clean_acc": scalars["margin/clean_acc"], "compare/high_band_share": high_band_share(low, high)}
    val_acc = trainer.callback_metrics.get("val/acc")
    if val_acc is not None:
        metrics["compare/val_acc"] = float(val_acc)
    for tag, value in metrics.items():
        writer.add_scalar(tag, value, step)


def card_figure(report: MarginReport, title: str) -> Figure:
    """The paper's plot of `report` for a TensorBoard card: `plot_margins` with the title and subtitle of the
    result folder's margins.png, at `TENSORBOARD_FIGSIZE`, at most 6 subspace numbers, the title over the whole
    card and broken to fit its width (`title_over_figure`; draw it under `TENSORBOARD_FONTS`)."""
    wrong = np.asarray(report.predicted) != np.asarray(report.targets)
    fig = Figure(figsize=TENSORBOARD_FIGSIZE, layout="constrained")
    ax = fig.add_subplot()
    plot_margins(report.margins, report.converged, title=title, misclassified=wrong, ax=ax,
                 estimator=estimator_of(report.settings), family=report.settings.get("subspace"))  # fmt: skip
    numbers = np.arange(np.asarray(report.margins).shape[0])
    every = max(2, -(-len(numbers) // 6))
    ax.set_xticks(numbers, [str(n) if n % every == 0 else "" for n in numbers], minor=True)
    title_over_figure(fig, ax)
    return fig


def card_evolution(epochs: list[int], medians: np.ndarray, title: str, num_samples: int) -> Figure:
    """`plot_margin_evolution` for a TensorBoard card: `TENSORBOARD_FIGSIZE` (wider for many epochs), the long
    axis and colour-bar labels on two lines, the title over the whole card and broken to fit its width (draw it
    under `TENSORBOARD_FONTS`)."""
    fig = plot_margin_evolution(epochs, medians, title=title, num_samples=num_samples)
    fig.set_size_inches(max(TENSORBOARD_FIGSIZE[0], fig.get_figwidth()), TENSORBOARD_FIGSIZE[1])
    for ax in fig.axes:
        ax.set_ylabel(two_lines(ax.get_ylabel()))
    title_over_figure(fig, fig.axes[0])
    return fig


def title_over_figure(fig: Figure, ax: Axes) -> None:
    """Move `ax`'s title to the figure's (centred on the whole card, not on the axes beside a legend or colour
    bar, whose centre lies left of the card's), each line broken after commas, or else at spaces, where it is
    wider than the card (`wrap_to_width`)."""
    title = ax.get_title()
    if not title:
        return
    ax.set_title("")
    size = matplotlib.rcParams["font.size"]  # "medium", as plot_margins draws its title
    fig.suptitle(wrap_to_width(title, 0.96 * fig.get_figwidth() * fig.dpi, size, fig.dpi), fontsize=size)


def wrap_to_width(text: str, width: float, fontsize: float, dpi: float) -> str:
    """`text` with each line broken after its commas, or else at its spaces, so that no line is wider than `width`
    pixels at `fontsize` points and `dpi` (a single word wider than that stays whole)."""
    renderer, font = RendererAgg(1, 1, dpi), FontProperties(size=fontsize)

    def fits(line: str) -> bool:
        return renderer.get_text_width_height_descent(line, font, ismath=False)[0] <= width

    def greedy(line: str, separator: str) -> list[str]:
        lines: list[str] = []
        for piece in line.split(separator):
            candidate = f"{lines[-1]}{separator}{piece}" if lines else piece
            if lines and fits(candidate + separator.rstrip()):  # room for the comma if broken after it
                lines[-1] = candidate
            else:
                if lines:
                    lines[-1] += separator.rstrip()  # a broken line keeps its comma
                lines.append(piece)
        return lines

    out = []
    for line in text.split("\n"):
        for part in greedy(line, ", "):
            out += [part] if fits(part) else greedy(part, " ")
    return "\n".join(out)


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


def high_band_share(low: float, high: float) -> float:
    """high / (low + high): the ratio high / low on a bounded scale, in [0, 1] (0.5: equal bands; a ratio of 18.5
    gives 0.949, 0.2 gives 0.167); NaN when both are 0."""
    total = low + high
    return high / total if total > 0 else float("nan")


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
