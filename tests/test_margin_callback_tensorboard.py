"""What a researcher sees in TensorBoard and the terminal from the margin callback, read back from the event files:
the schedule (fit end included), the custom-scalars charts (one unit per axis, in reading order, one profile chart
per measurement whose x is the subspace), scalars at the step of val/*, the compare scalars on the Scalars tab's axis
for two runs, the HPARAMS table and the custom-scalars layout as TensorBoard builds them from two runs, the card
images titled as the result folder's figure with every text inside, the terminal summary, the evolution history."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import matplotlib
import numpy as np
import pytest
import torch
from google.protobuf import json_format
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util

from callbacks import MarginCallback
from callbacks.margin import run_label
from callbacks.tensorboard import (
    TENSORBOARD_FIGSIZE,
    TENSORBOARD_FONTS,
    band_medians,
    card_evolution,
    card_figure,
    margin_layout,
    median_tags,
    profile_tag,
    two_lines,
    wrap_to_width,
)
from datamodules import SyntheticDataModule
from lightning_modules import ClassifierModule
from margins import read_report
from margins.settings import AttackSettings, RowSettings
from margins.store.results import MarginReport
from plotting.margins import plot_margins
from train import main

REPO = Path(__file__).resolve().parents[1]
SYNTHETIC = dict(image_shape=(1, 16, 16), num_train=128, num_test=32, batch_size=64, sigma=0.5, eps=4.0)
FAST_MARGIN = ["--margin.rows.num_samples", "4", "--margin.attack.max_iter", "20", "--margin.attack.chunk_rows", "64"]


def events(log_dir: str | Path) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0, "images": 0, "histograms": 0})
    acc.Reload()
    return acc


def steps(acc: EventAccumulator, tag: str) -> list[int]:
    return [e.step for e in acc.Scalars(tag)]


def last_layout(acc: EventAccumulator) -> layout_pb2.Layout:
    """The custom-scalars layout TensorBoard uses for a run: the last one written."""
    event = acc.Tensors("custom_scalars__config__")[-1]
    return layout_pb2.Layout.FromString(tensor_util.make_ndarray(event.tensor_proto).item())


def scalars_tab_axis(values: list[float]) -> tuple[float, float]:
    """The y range of a chart of TensorBoard's Scalars tab (2.21, vz_line_chart2's linear scale) with its default
    "Ignore outliers in chart scaling": the values between the 5% and 95% quantiles (linear interpolation, as d3's
    and numpy's) span the axis (then padded); when none is left (e.g. two runs with one distinct point each) the
    axis is the scale's default 0 to 1."""
    kept = [v for v in values if np.quantile(values, 0.05) <= v <= np.quantile(values, 0.95)]
    return (min(kept), max(kept)) if kept else (0.0, 1.0)


COMPARE = {"compare/clean_acc", "compare/high_band_share", "compare/val_acc"}


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


UNITS = {"margin/median/": "L2", "margin/profile/": "L2", "margin/band_median/": "L2", "margin/high_over_low": "ratio",
         "margin/clean_acc": "fraction", "margin/not_converged": "rows"}  # fmt: skip


def unit(tag: str) -> str:
    (found,) = [u for prefix, u in UNITS.items() if tag.startswith(prefix)]
    return found


def charts_as_read(layout: layout_pb2.Layout) -> dict[str, list[str]]:
    """The margin section's charts in the order TensorBoard shows them (it lays margin charts out last to first),
    each with its value tags; every series is drawn with its band equal to its value."""
    (category,) = [c for c in layout.category if c.title == "margin"]
    charts = {}
    for chart in reversed(category.chart):
        assert chart.WhichOneof("content") == "margin", chart.title
        assert all(s.lower == s.value == s.upper for s in chart.margin.series), chart.title
        charts[chart.title] = [s.value for s in chart.margin.series]
    return charts


def test_custom_scalars_one_quantity_per_chart_then_one_profile_per_measurement():
    charts = charts_as_read(margin_layout(21, profiles={"epoch_004": "epoch 4", "test_epoch_009": "test, epoch 9"}))
    assert list(charts.items()) == [
        ("high-band / low-band median margin", ["margin/high_over_low"]),
        ("median margin (L2): low band (subspaces 0-2), high band (18-20)",
         ["margin/band_median/low", "margin/band_median/high"]),
        ("clean accuracy of the measured samples", ["margin/clean_acc"]),
        ("not-converged (sample, subspace) rows", ["margin/not_converged"]),
        ("median margin (L2) per subspace, epoch 4: x = subspace 0-20, low → high frequency",
         ["margin/profile/epoch_004"]),
        ("median margin (L2) per subspace, test, epoch 9: x = subspace 0-20, low → high frequency",
         ["margin/profile/test_epoch_009"]),
    ]  # fmt: skip
    assert all(len({unit(tag) for tag in tags}) == 1 for tags in charts.values())  # one unit per axis
    assert all(2 * len(tags) <= 13 for tags in list(charts.values())[:4])  # two runs measured once: all on the axis
    assert len(charts_as_read(margin_layout(21))) == 4  # no measurement yet: no profile chart
    small = charts_as_read(margin_layout(2, band_width=3))  # bands capped at half the subspaces
    assert "median margin (L2): low band (subspaces 0-0), high band (1-1)" in small


def test_one_epoch_fit_with_the_default_config_measures_once_and_fills_the_tensorboard_view(
    tmp_path, monkeypatch, capsys
):
    """configs/mnist_lenet.yaml as written (every_n_epochs 5, default_hp_metric false) on tiny synthetic data:
    what TensorBoard and the terminal show."""
    monkeypatch.setattr("sys.argv", ["train.py"])
    titles = title_spy(monkeypatch)
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
    for tag in ("margin/clean_acc", "margin/not_converged", "margin/high_over_low", median_tags(num_subspaces)[0]):
        assert steps(acc, tag) == val_step, tag  # exactly once, at the step of val/*
    assert "hp_metric" not in tags["scalars"]

    layout = last_layout(acc)
    charts = charts_as_read(layout)
    assert layout == margin_layout(num_subspaces, profiles={"epoch_000": "epoch 0"})
    assert {tag for chart in charts.values() for tag in chart} <= set(tags["scalars"])  # no empty chart
    margin_cards = [t for kind in ("scalars", "histograms", "images") for t in tags[kind] if t.startswith("margin/")]
    assert len(margin_cards) == num_subspaces + 5 + 1 + 2 + 2  # medians, 5 quantities, profile, histograms, images

    saved = read_report(log_dir / "margins" / "epoch_000")
    assert saved.settings["chunk_rows"] == 64 and saved.extra["num_chunks"] == 1  # 4 samples x 9 subspaces
    profile = acc.Scalars(profile_tag("epoch_000"))  # x = subspace index: the chart's axis names the subspace
    assert [e.step for e in profile] == list(range(num_subspaces))
    assert [e.value for e in profile] == pytest.approx(np.median(saved.margins, axis=1), rel=1e-6)
    low, high = band_medians(saved.margins)
    assert acc.Scalars("margin/high_over_low")[0].value == pytest.approx(high / low, rel=1e-5)
    assert acc.Scalars("margin/clean_acc")[0].value == pytest.approx(saved.extra["clean_accuracy"])
    assert acc.Scalars("margin/not_converged")[0].value == saved.stats["num_not_converged_total"]
    assert {"margin/distribution", "margin/evolution"} <= set(tags["images"])
    for tag in ("margin/distribution", "margin/evolution"):  # the size of a TensorBoard card, not of the disk figure
        assert (acc.Images(tag)[0].width, acc.Images(tag)[0].height) == (640, 305)
    (disk_title,) = titles["disk"]  # margins.png and margin/distribution: one title, one subtitle
    assert disk_title.startswith("lenet on synthetic (transform none), epoch 0: DeepFool margins\n4 samples, 9 subsp")
    (card,) = titles["tensorboard"]
    assert card.get_suptitle().split() == disk_title.split()  # the same words, lines broken to fit the card
    assert texts_outside(card) == []

    hp = hparams_plugin_data(log_dir)
    assert "_hparams_/experiment" not in hp  # TensorBoard builds the table from all runs: what differs first
    session = hp["_hparams_/session_start_info"].session_start_info.hparams
    assert dict(sorted((k, v.WhichOneof("kind")) for k, v in session.items())) == CURATED_STANDARD
    assert session["net"].string_value == "lenet" and session["dataset"].string_value == "synthetic"
    assert session["transform"].string_value == "none" and session["margin/samples"].number_value == 4
    assert session["pgd/eps"].number_value == 0 and session["pgd/projection"].string_value == "none"
    assert session["train/epochs"].number_value == 1 and session["train/seed"].number_value == 0
    assert session["train/batch_size"].number_value == 64 and session["train/lr"].number_value == 0.21
    assert {t for t in tags["scalars"] if t.startswith("compare/")} == COMPARE
    assert acc.Scalars("compare/val_acc")[0].value == pytest.approx(acc.Scalars("val/acc")[0].value)
    assert acc.Scalars("compare/clean_acc")[0].value == acc.Scalars("margin/clean_acc")[0].value
    assert acc.Scalars("compare/high_band_share")[0].value == pytest.approx(high / (low + high), rel=1e-6)

    out, err = capsys.readouterr()
    assert "margins epoch 0: (sample, subspace) rows: 100%" in err and "36/36" in err  # the bar names what it counts
    assert "margins epoch 0: 4 samples x 9 subspaces in " in out
    assert f"median margin (L2): low band (subspaces 0-2) {low:.3g}, high band (6-8) {high:.3g}, high/low " in out
    assert f"clean accuracy {saved.extra['clean_accuracy']:.1%}, not converged 0 of 36 rows" in out
    assert f"run folder:      {log_dir}" in out and f"last checkpoint: {log_dir}/checkpoints/last.ckpt" in out


CURATED_STANDARD = {
    "dataset": "string_value", "margin/samples": "number_value", "net": "string_value",
    "pgd/eps": "number_value", "pgd/projection": "string_value", "pgd/steps": "number_value",
    "train/batch_size": "number_value", "train/epochs": "number_value", "train/lr": "number_value",
    "train/seed": "number_value", "transform": "string_value",
}  # fmt: skip


def texts_outside(fig) -> list[float]:
    """How far (inches, [left, bottom, right, top]) what `fig` draws (titles, labels, tick labels, legend) reaches
    beyond its edges, as drawn like the TensorBoard card; [] when everything is inside (nothing clipped)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    box = fig.get_tightbbox(fig.canvas.get_renderer())  # only what is drawn, e.g. no tick label outside its axis
    width, height = fig.get_size_inches()
    beyond = [max(0.0, -box.x0), max(0.0, -box.y0), max(0.0, box.x1 - width), max(0.0, box.y1 - height)]
    return beyond if max(beyond) > 0.005 else []


def title_spy(monkeypatch) -> dict[str, list]:
    """The margin plots drawn: "disk", the title of margins.png of the result folder; "tensorboard", the figure of
    the `margin/distribution` image (its title is read once the card is finished)."""
    import plotting.margins

    titles: dict[str, list] = {"disk": [], "tensorboard": []}
    original = plotting.margins.plot_margins

    def spy(*args, **kwargs):
        figure = original(*args, **kwargs)
        card = kwargs.get("ax") is not None
        titles["tensorboard" if card else "disk"].append(figure if card else figure.axes[0].get_title())
        return figure

    monkeypatch.setattr(plotting.margins, "plot_margins", spy)
    monkeypatch.setattr("callbacks.tensorboard.plot_margins", spy)
    return titles


def test_two_runs_as_tensorboard_shows_them_hparams_compare_axis_and_custom_scalars(tmp_path, monkeypatch):
    """Two runs differing only in the transform, measured once each. HPARAMS, as TensorBoard's backend builds its
    table: the transform first, then the curated settings by name (the first five are shown), the compared metrics
    first. The Scalars tab: every `compare/*` chart's axis holds both runs. CUSTOM SCALARS, as its plugin merges the
    runs' layouts: one profile chart holds both runs."""
    from tensorboard import context as tb_context
    from tensorboard.backend.event_processing import data_provider
    from tensorboard.backend.event_processing import plugin_event_multiplexer as multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import backend_context

    monkeypatch.setattr("sys.argv", ["train.py"])
    for transform in ("none", "flip"):
        main(["fit", "--config", str(REPO / "configs" / "synthetic_lenet.yaml"), "--data.init_args.image_shape",
              "[1, 16, 16]", "--data.init_args.num_train", "64", "--data.init_args.num_test", "16",
              "--data.init_args.batch_size", "64", "--data.init_args.transform", transform, "--trainer.max_epochs", "1",
              "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
              "--margin.rows.num_samples", "2", "--margin.attack.max_iter", "10",
              "--margin.log_figure", "false"])  # fmt: skip
    mux = multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(tmp_path))
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, str(tmp_path))
    hparams = backend_context.Context(base_plugin.TBContext(logdir=str(tmp_path), data_provider=provider))
    request = tb_context.RequestContext()
    metadata = hparams.hparams_metadata(request, "")
    experiment = hparams.experiment_from_metadata(
        request, "", True, metadata, hparams.hparams_from_data_provider(request, "", None)
    )
    shown = [h.name for h in experiment.hparam_infos][:5]
    assert shown == ["transform", "dataset", "margin/samples", "net", "pgd/eps"]
    assert [h.name for h in experiment.hparam_infos if h.differs] == ["transform"]
    assert {h.name for h in experiment.hparam_infos} == set(CURATED_STANDARD)  # no paths, no class names
    metrics = [m.name.tag for m in experiment.metric_infos][:3]
    assert metrics == sorted(COMPARE)

    from tensorboard.data import provider as data

    served = provider.read_scalars(request, experiment_id="", plugin_name="scalars", downsample=100,
                                   run_tag_filter=data.RunTagFilter(tags=sorted(COMPARE)))  # fmt: skip
    assert len(served) == 2 and all(set(tags) == COMPARE for tags in served.values())
    for tag in COMPARE:  # one point per run: "ignore outliers" leaves none, the axis is 0-1, which holds fractions
        values = [points[tag][-1].value for points in served.values()]
        axis = scalars_tab_axis(values)
        assert all(axis[0] <= v <= axis[1] for v in values), (tag, values, axis)
    assert scalars_tab_axis([18.5, 0.225]) == (0.0, 1.0)  # as a raw ratio (issue 32), 18.5 was off the axis

    from tensorboard.plugins.custom_scalar.custom_scalars_plugin import CustomScalarsPlugin

    context = base_plugin.TBContext(logdir=str(tmp_path), data_provider=provider, multiplexer=mux)
    merged = layout_pb2.Layout()
    json_format.Parse(CustomScalarsPlugin(context).layout_impl(request, ""), merged)
    profiles = [c for c in merged.category[0].chart if "per subspace" in c.title]
    assert [[s.value for s in c.margin.series] for c in profiles] == [[profile_tag("epoch_000")]]


def test_fit_end_measures_a_model_stopped_early_once_and_only_if_not_measured(tmp_path):
    class StopAfterFirstValidation(L.Callback):  # what EarlyStopping does: stop after a validation
        def on_validation_end(self, trainer, pl_module):
            trainer.should_stop = True

    class StopMidEpoch(L.Callback):  # what max_time does: stop between two training batches
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.current_epoch == 1:
                trainer.should_stop = True

    def callback(every_n_epochs: int) -> MarginCallback:
        return MarginCallback(RowSettings(num_samples=3), AttackSettings(max_iter=10), every_n_epochs=every_n_epochs)

    early = fit(tmp_path / "early", callback(5), 4, [StopAfterFirstValidation()])
    acc = events(early.log_dir)
    assert steps(acc, "margin/median/subspace_00") == steps(acc, "val/acc") == [1]  # at fit end, val's step
    assert [p.name for p in (Path(early.log_dir) / "margins").iterdir()] == ["epoch_000"]

    mid = fit(tmp_path / "mid", callback(1), 4, [StopMidEpoch()])
    acc = events(mid.log_dir)  # Lightning validates the stopped model; the fit end does not measure it again
    assert mid.global_step == 3 and steps(acc, "val/acc") == steps(acc, "margin/median/subspace_00") == [1, 2]

    noval = fit(tmp_path / "noval", callback(1), 3, check_val_every_n_epoch=2)
    acc = events(noval.log_dir)  # the last epoch has no validation: the final weights are measured at fit end
    assert steps(acc, "val/acc") == [3] and steps(acc, "margin/median/subspace_00") == [3, 6]
    assert [tags for tags in charts_as_read(last_layout(acc)).values()][4:] == [
        [profile_tag("epoch_001")], [profile_tag("epoch_002")]]  # fmt: skip
    assert sorted(p.name for p in (Path(noval.log_dir) / "margins").iterdir()) == ["epoch_001", "epoch_002"]

    off = fit(
        tmp_path / "off", MarginCallback(rows=RowSettings(num_samples=3), every_n_epochs=5, measure_at_fit_end=False), 1
    )
    assert not (Path(off.log_dir) / "margins").exists()


def test_history_image_and_resume_keep_every_measured_epoch(tmp_path):
    first = MarginCallback(rows=RowSettings(num_samples=3), attack=AttackSettings(max_iter=10), every_n_epochs=1)
    trainer = fit(tmp_path, first, 1, schedule="constant")  # a longer resume keeps a constant schedule
    assert sorted(first.history) == [0] and len(first.history[0]) == len(trainer.datamodule.subspaces())
    ckpt = tmp_path / "one.ckpt"
    trainer.save_checkpoint(ckpt)
    saved_state = torch.load(ckpt, weights_only=False, map_location="cpu")["callbacks"][first.state_key]
    assert saved_state["history"] == first.history

    resumed = MarginCallback(rows=RowSettings(num_samples=3), attack=AttackSettings(max_iter=10), every_n_epochs=1)
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


def test_run_labels_name_the_stage_and_epoch_of_a_folder():
    assert run_label("epoch_003") == "epoch 3"
    assert run_label("test_epoch_000") == "test, epoch 0"
    assert run_label("custom") == "custom"


def test_card_images_fit_tensorboards_image_box_with_labels_on_two_lines():
    """Time Series shows an image in a box about 452 x 215 px: the cards' figures are scaled by 0.7 at least."""
    assert two_lines("Subspace (low → high frequency)") == "Subspace\n(low → high frequency)"
    assert two_lines("median margin (L2), 1.34 to 21.4") == "median margin (L2),\n1.34 to 21.4"
    width, height = (100 * v for v in TENSORBOARD_FIGSIZE)
    assert min(452 / width, 215 / height) >= 0.7


def test_card_images_keep_every_text_inside_with_the_result_folders_title():
    """A flipped run's card once cut "100 samples" to ".00 samples": its title, centred on the axes beside the
    legend, reached past the card's left edge. The cards put the title over the whole card, broken to fit."""
    rng = np.random.default_rng(0)
    margins = rng.gamma(2.0, 3.0, size=(21, 100)).astype(np.float32)
    converged = np.ones(margins.shape, dtype=bool)
    converged[3, :2] = False
    targets = np.zeros(100, dtype=np.int64)
    predicted = np.where(np.arange(100) < 7, 1, 0)
    report = MarginReport(margins, converged, np.arange(100), {"estimator": "fmn"}, predicted=predicted,
                          targets=targets)  # fmt: skip
    title = "resnet18 on cifar10 (transform low_pass), test, epoch 12"
    with matplotlib.rc_context(TENSORBOARD_FONTS):
        before = Figure(figsize=TENSORBOARD_FIGSIZE, layout="constrained")  # the title on the axes, as before
        plot_margins(margins, converged, title, before.add_subplot(), misclassified=predicted != targets)
        assert texts_outside(before)[0] > 0.5  # cut at the left edge
        card = card_figure(report, title)
        evolution = card_evolution([0, 5, 10, 15], margins[:, :4], "resnet18 on cifar10 (transform low_pass)", 100)
        assert texts_outside(card) == [] and texts_outside(evolution) == []
    expected = f"{title}: FMN margins\n100 samples, 21 subspaces, 7 misclassified, 2 not converged"
    assert card.get_suptitle().split() == expected.split()  # the result folder's title and subtitle, rewrapped
    assert len(card.get_suptitle().splitlines()) > 2


def test_wrap_to_width_breaks_after_commas_then_at_spaces():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    text = "100 samples, 21 subspaces, 7 misclassified, 2 not converged"
    assert wrap_to_width(text, 10_000, 13, 100) == text
    lines = wrap_to_width(text, 150, 13, 100).splitlines()
    assert lines == ["100 samples,", "21 subspaces,", "7 misclassified,", "2 not converged"]
    assert wrap_to_width("one very long name", 100, 13, 100).splitlines() == ["one very", "long name"]
    fig = Figure(dpi=100)
    renderer = FigureCanvasAgg(fig).get_renderer()
    widths = [fig.text(0, 0, line, fontsize=13).get_window_extent(renderer).width for line in lines]
    assert max(widths) <= 150  # measured as matplotlib draws them
