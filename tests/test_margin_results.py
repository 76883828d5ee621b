"""Tests of the margins package: sample selection, atomic result files (`write_report` / `read_report`), the paper
plot, an analytic margin measured through `evaluate_margins`."""

from __future__ import annotations

import json
import os

import matplotlib.colors as mcolors
import numpy as np
import pytest
import torch
from matplotlib.collections import PathCollection
from torch import nn

import plotting.margins as plot_module
from frequency.subspaces import DCTBlockSubspaces, FullSpace
from margins import (
    MarginReport,
    load_indices,
    read_report,
    select_indices,
    summarize,
    write_report,
)
from margins.inputs import gather_samples
from margins.run.evaluate import evaluate_margins
from margins.settings import AttackSettings, RunSettings
from margins.store.results import RESULT_FILES, SCHEMA_VERSION
from plotting.margins import figure_to_array, plot_margins, save_figure


def _example(num_subspaces: int = 4, num_samples: int = 7, seed: int = 0):
    rng = np.random.default_rng(seed)
    margins = rng.gamma(2.0, 1.0, size=(num_subspaces, num_samples))
    converged = rng.random((num_subspaces, num_samples)) > 0.25
    indices = rng.choice(1000, size=num_samples, replace=False)
    return margins, converged, indices


def _write(out, margins, converged, indices, settings, extra=None, figure=True):
    """`write_report` of the three required arrays (the optional ones left out)."""
    report = MarginReport(margins, converged, indices, settings, extra=extra or {})
    return write_report(out, report, figure=figure)


def _snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# ---------------------------------------------------------------- selection and loading


def test_select_indices_deterministic_distinct_in_range():
    a = select_indices(60000, 100, seed=3)
    b = select_indices(60000, 100, seed=3)
    c = select_indices(60000, 100, seed=4)
    assert a.dtype == np.int64 and a.shape == (100,)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len(np.unique(a)) == 100 and a.min() >= 0 and a.max() < 60000
    assert np.all(np.diff(a) > 0)  # documented: sorted ascending
    np.testing.assert_array_equal(select_indices(5, 5, seed=0), np.arange(5))  # the whole dataset


@pytest.mark.parametrize("num_samples", [0, -1, 11])
def test_select_indices_rejects_bad_counts(num_samples):
    with pytest.raises(ValueError, match="num_samples"):
        select_indices(10, num_samples, seed=0)


def test_load_indices_round_trip_and_errors(tmp_path):
    path = tmp_path / "idx.npy"
    np.save(path, np.array([5, 2, 9], dtype=np.int32))
    loaded = load_indices(path, dataset_size=10)
    assert loaded.dtype == np.int64
    np.testing.assert_array_equal(loaded, [5, 2, 9])  # file order kept

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_indices(tmp_path / "missing.npy", 10)
    cases = {
        "float": (np.array([1.0, 2.0]), "integers"),
        "matrix": (np.array([[1, 2], [3, 4]]), "1-D"),
        "range": (np.array([1, 10, -1]), r"outside \[0, 10\).*\[10, -1\]"),
        "dup": (np.array([3, 1, 3, 4, 1]), r"duplicates: \[1, 3\]"),
    }
    for name, (array, message) in cases.items():
        np.save(tmp_path / f"{name}.npy", array)
        with pytest.raises(ValueError, match=message):
            load_indices(tmp_path / f"{name}.npy", 10)
    (tmp_path / "junk.npy").write_text("not numpy")
    with pytest.raises(ValueError, match="cannot read"):
        load_indices(tmp_path / "junk.npy", 10)


def test_gather_samples_matches_dataset_items():
    images = torch.rand(6, 1, 4, 4)
    labels = torch.tensor([3, 1, 4, 1, 5, 9])
    dataset = list(zip(images, labels))
    x, y = gather_samples(dataset, np.array([4, 0, 2]))
    assert x.shape == (3, 1, 4, 4) and y.dtype == torch.long
    torch.testing.assert_close(x, images[[4, 0, 2]], rtol=0, atol=0)
    assert y.tolist() == [5, 3, 4]
    with pytest.raises(TypeError, match="ToTensor"):
        gather_samples([("image", 0)], [0])


# ---------------------------------------------------------------- summary and files


def test_summarize_matches_numpy():
    margins, converged, _ = _example()
    converged[2] = False  # a subspace with no converged sample
    stats = summarize(margins, converged)
    for s in range(margins.shape[0]):
        assert stats["median_margin_all"][s] == pytest.approx(np.median(margins[s]), rel=1e-12)
        if s == 2:
            assert np.isnan(stats["median_margin"][s])
        else:
            assert stats["median_margin"][s] == pytest.approx(np.median(margins[s][converged[s]]), rel=1e-12)
    assert stats["num_not_converged"] == [int(n) for n in (~converged).sum(axis=1)]
    assert stats["num_not_converged_total"] == int((~converged).sum())


def test_write_read_round_trip(tmp_path):
    margins, converged, indices = _example()
    out = tmp_path / "run"
    settings = {"dataset": "mnist", "block": 8, "overshoot": np.float32(0.02), "shape": (1, 28, 28)}
    extra = {"clean_accuracy": torch.tensor(0.98), "checkpoint": tmp_path / "model.ckpt", "seconds": 1.5}
    assert _write(out, margins, converged, indices, settings, extra=extra) == out
    assert sorted(p.name for p in out.iterdir()) == sorted(RESULT_FILES)
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temporary directory left

    loaded = read_report(out)
    assert loaded.margins.dtype == np.float32 and loaded.converged.dtype == np.bool_
    assert loaded.indices.dtype == np.int64
    np.testing.assert_array_equal(loaded.margins, margins.astype(np.float32))
    np.testing.assert_array_equal(loaded.converged, converged)
    np.testing.assert_array_equal(loaded.indices, indices)
    assert loaded.iterations is None and loaded.targets is None  # optional arrays not given: no files
    summary = json.loads((out / "summary.json").read_text())

    stored = margins.astype(np.float32).astype(np.float64)
    expected_conv = [np.median(stored[s][converged[s]]) for s in range(stored.shape[0])]
    np.testing.assert_allclose(loaded.stats["median_margin"], expected_conv, rtol=1e-12)
    np.testing.assert_allclose(loaded.stats["median_margin_all"], np.median(stored, axis=1), rtol=1e-12)
    assert loaded.stats["num_not_converged_total"] == int((~converged).sum())
    assert (
        loaded.settings
        == summary["settings"]
        == {
            "dataset": "mnist",
            "block": 8,
            "overshoot": pytest.approx(0.02),
            "shape": [1, 28, 28],
        }
    )
    assert loaded.extra["clean_accuracy"] == pytest.approx(0.98)
    assert loaded.extra["checkpoint"] == str(tmp_path / "model.ckpt")
    assert summary["shape"] == list(margins.shape) and summary["schema_version"] == SCHEMA_VERSION


def test_rewrite_replaces_results_and_keeps_unrelated_files(tmp_path):
    out = tmp_path / "run"
    margins, converged, indices = _example(seed=0)
    _write(out, margins, converged, indices, {"run": 1})
    (out / "notes.txt").write_text("keep me")
    margins2, converged2, indices2 = _example(num_subspaces=3, num_samples=5, seed=1)
    _write(out, margins2, converged2, indices2, {"run": 2}, figure=False)
    loaded = read_report(out)
    np.testing.assert_array_equal(loaded.margins, margins2.astype(np.float32))
    np.testing.assert_array_equal(loaded.indices, indices2)
    assert loaded.settings == {"run": 2}
    assert (out / "notes.txt").read_text() == "keep me"
    assert not (out / "margins.png").exists()  # stale figure of the previous set removed
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_failure_mid_write_leaves_previous_results_intact(tmp_path, monkeypatch):
    out = tmp_path / "run"
    margins, converged, indices = _example()
    _write(out, margins, converged, indices, {"run": 1})
    before = _snapshot(out)

    def broken_plot(*args, **kwargs):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(plot_module, "plot_margins", broken_plot)  # results imports it when it draws
    margins2, converged2, indices2 = _example(seed=5)
    with pytest.raises(RuntimeError, match="plot failed"):
        _write(out, margins2, converged2, indices2, {"run": 2})
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["run"]

    fresh = tmp_path / "fresh"  # absent directory: it must not appear at all
    with pytest.raises(RuntimeError, match="plot failed"):
        _write(fresh, margins2, converged2, indices2, {"run": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_interrupted_commit_is_detected(tmp_path, monkeypatch):
    out = tmp_path / "run"
    margins, converged, indices = _example()
    _write(out, margins, converged, indices, {"run": 1})
    real_replace, calls = os.replace, []

    def crash_after_first(src, dst):
        calls.append(dst)
        if len(calls) > 1:
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_after_first)
    with pytest.raises(OSError, match="simulated crash"):
        _write(out, margins * 2, converged, indices, {"run": 2})
    monkeypatch.setattr(os, "replace", real_replace)
    assert json.loads((out / "summary.json").read_text())["settings"] == {"run": 1}  # old commit marker kept
    with pytest.raises(ValueError, match="inconsistent: margins.npy"):
        read_report(out)
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_write_rejects_bad_input_before_writing(tmp_path):
    margins, converged, indices = _example()
    out = tmp_path / "run"
    nan_margins = margins.copy()
    nan_margins[1, 3] = np.nan
    cases = [
        ((nan_margins, converged, indices), ValueError, r"NaN.*subspace 1, sample 3"),
        ((margins, converged[:, :-1], indices), ValueError, "shape"),
        ((margins, converged.astype(int), indices), ValueError, "bool"),
        ((margins, converged, indices[:-1]), ValueError, r"\[N\]"),
        ((margins[0], converged[0], indices), ValueError, r"\[S, N\]"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            _write(out, *args, settings={})
    with pytest.raises(TypeError, match=r"settings.model"):
        _write(out, margins, converged, indices, settings={"model": nn.Linear(1, 1)})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="summary.json"):
        read_report(out)


# ---------------------------------------------------------------- plot


def test_plot_artists_match_data():
    margins, converged, _ = _example(num_subspaces=5, num_samples=9)
    fig = plot_margins(margins, converged, title="MNIST")
    ax = fig.axes[0]
    scatters = [c for c in ax.collections if isinstance(c, PathCollection)]
    by_label = {c.get_label(): c for c in scatters}
    missed = int((~converged).sum())
    assert set(by_label) == {"samples", f"not converged ({missed})"}
    np.testing.assert_allclose(np.sort(by_label["samples"].get_offsets()[:, 1]), np.sort(margins[converged]))
    bad_offsets = by_label[f"not converged ({missed})"].get_offsets()
    np.testing.assert_allclose(np.sort(bad_offsets[:, 1]), np.sort(margins[~converged]))
    assert np.allclose(by_label[f"not converged ({missed})"].get_facecolor()[0][:3], mcolors.to_rgb("red"))
    # jittered x stays near its subspace index
    assert np.all(np.abs(bad_offsets[:, 0] - np.round(bad_offsets[:, 0])) < 0.6)

    (median,) = [line for line in ax.lines if line.get_label() == "median"]
    np.testing.assert_allclose(median.get_ydata(), np.median(margins, axis=1))
    np.testing.assert_array_equal(median.get_xdata(), np.arange(5))
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["Low", "High"] and ax.get_xlabel() == "Frequency" and ax.get_ylabel() == "Margin (L2)"
    legend_texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert f"not converged ({missed})" in legend_texts and ax.get_title().startswith("MNIST\n9 samples")


def test_plot_all_converged_log_scale_and_raster(tmp_path):
    margins, _, _ = _example(num_subspaces=3, num_samples=4)
    fig = plot_margins(margins, log_scale=True)
    ax = fig.axes[0]
    (scatter,) = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert len(scatter.get_offsets()) == margins.size and ax.get_yscale() == "log"

    image = figure_to_array(fig, dpi=50)
    width, height = fig.get_size_inches() * 50
    assert image.dtype == np.uint8 and image.shape == (round(height), round(width), 3)
    assert image.min() < 100 and image.max() == 255  # dark ink on a white background
    path = save_figure(fig, tmp_path / "sub" / "m.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- end to end


def test_evaluate_margins_matches_analytic_affine_margin(tmp_path):
    """The whole pipeline (chunks, Trainer.predict, merge, result folder) on a two-class affine model, whose margin
    along a subspace S is 1.02 |g| / ||P_S w|| (g the logit gap, w the weight difference)."""
    torch.manual_seed(0)
    shape = (1, 8, 8)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2)).double()
    x = torch.rand(5, *shape, dtype=torch.float64)
    dataset = [(x[i], i % 2) for i in range(5)]
    attack = AttackSettings(overshoot=0.02, dtype="float64", chunk_rows=4)
    run = RunSettings(accelerator="cpu", devices=1, progress=False)
    common = {"model": model, "dataset": dataset, "indices": np.arange(5), "attack": attack, "run": run}
    report, folder = evaluate_margins(subspaces=FullSpace(shape), output_dir=tmp_path / "full", **common)
    assert report.extra["seconds"] > 0 and report.settings["dtype"] == "float64"

    weight, bias = model[1].weight.detach(), model[1].bias.detach()
    w_diff, b_diff = weight[1] - weight[0], bias[1] - bias[0]
    gap = (x.flatten(1) @ w_diff + b_diff).abs()
    expected = 1.02 * gap / w_diff.norm()
    assert report.margins.shape == (1, 5) and bool(report.converged.all())
    np.testing.assert_allclose(report.margins[0], expected.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(read_report(folder).margins, report.margins)
    np.testing.assert_array_equal(report.targets, [0, 1, 0, 1, 0])
    np.testing.assert_array_equal(report.predicted, (x.flatten(1) @ w_diff + b_diff > 0).long().numpy())

    # along DCT blocks the margin is |g| / ||P w|| with P the block projector (computed with an explicit basis)
    subspaces = DCTBlockSubspaces(shape, block=4, step=2)
    report, _ = evaluate_margins(subspaces=subspaces, output_dir=tmp_path / "dct", **common)
    eye = torch.eye(64, dtype=torch.float64).view(64, *shape)
    for s in range(len(subspaces)):
        projector = subspaces.project(eye, torch.full((64,), s)).flatten(1)  # rows: P e_i
        expected = 1.02 * gap / (projector @ w_diff).norm()
        np.testing.assert_allclose(report.margins[s], expected.numpy(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- typed schema (schema_version 3) and old folders


def test_report_round_trip_with_every_field(tmp_path):
    margins, converged, indices = _example(num_subspaces=3, num_samples=5)
    rng = np.random.default_rng(1)
    report = MarginReport(
        margins=margins,
        converged=converged,
        indices=indices,
        settings={"dtype": "float64"},
        iterations=rng.integers(1, 100, size=(3, 5)),
        perturbed_labels=rng.integers(0, 10, size=(3, 5)),
        predicted=rng.integers(0, 10, size=5),
        targets=rng.integers(0, 10, size=5),
        extra={"seconds": 2.0},
    )
    write_report(tmp_path / "run", report, figure=False)
    back = read_report(tmp_path / "run")
    assert back.schema_version == SCHEMA_VERSION and back.settings == {"dtype": "float64"}
    assert back.extra == {"seconds": 2.0}
    np.testing.assert_array_equal(back.margins, margins.astype(np.float32))
    for key in ("iterations", "perturbed_labels", "predicted", "targets"):
        np.testing.assert_array_equal(getattr(back, key), getattr(report, key))
        assert getattr(back, key).dtype == np.int64
    assert back.stats["num_not_converged_total"] == int((~converged).sum())
    with pytest.raises(ValueError, match=r"iterations must have shape \[3, 5\]"):
        write_report(tmp_path / "bad", MarginReport(margins, converged, indices, {}, iterations=np.zeros((5, 3))))


def test_folder_of_format_version_1_still_reads(tmp_path):
    """The layout written before the schema existed: summary.json with format_version 1, three arrays."""
    import hashlib

    margins, converged, indices = _example()
    out = tmp_path / "old"
    out.mkdir()
    arrays = {"margins.npy": margins.astype(np.float32), "converged.npy": converged, "indices.npy": indices}
    for name, array in arrays.items():
        np.save(out / name, array)
    files = {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in arrays}
    summary = {"format_version": 1, "shape": list(margins.shape), "settings": {"run": "old"}, "stats": {},
               "extra": {"clean_accuracy": 0.5}, "files": files}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary))
    report = read_report(out)
    assert report.schema_version == 1 and report.settings == {"run": "old"} and report.iterations is None
    np.testing.assert_array_equal(report.margins, margins.astype(np.float32))
    np.testing.assert_array_equal(report.indices, indices)
    assert report.targets is None and report.predicted is None and report.extra == {"clean_accuracy": 0.5}


def test_a_folder_of_schema_2_reads_under_the_current_setting_names(tmp_path):
    """Schema 2 named the block side `subspace_block` and each subspace's dimension `subspace_dims`; they read back
    as `subspace_dim` (the flag's name) and `subspace_size`, other settings unchanged."""
    margins, converged, indices = _example()
    settings = {"subspace": "dct", "subspace_dim": 8, "subspace_size": 64, "subspace_step": 1, "seed": 3}
    write_report(tmp_path / "run", MarginReport(margins, converged, indices, settings), figure=False)
    summary_path = tmp_path / "run" / "summary.json"
    summary = json.loads(summary_path.read_text())
    old = {"subspace": "dct", "subspace_block": 8, "subspace_dims": 64, "subspace_step": 1, "seed": 3}
    summary.update(schema_version=2, settings=old)
    summary_path.write_text(json.dumps(summary))
    back = read_report(tmp_path / "run")
    assert back.schema_version == 2 and back.settings == settings


def test_stale_temporary_folders_of_killed_writers_are_removed(tmp_path):
    from margins.store.results import remove_stale_tmp_dirs

    old, fresh = tmp_path / ".run.tmp-old", tmp_path / ".run.tmp-fresh"
    old.mkdir()
    fresh.mkdir()
    os.utime(old, (0, 0))  # left by a writer killed long ago
    margins, converged, indices = _example()
    _write(tmp_path / "run", margins, converged, indices, {}, figure=False)
    assert not old.exists() and fresh.exists()  # a concurrent writer's fresh folder is left alone
    assert remove_stale_tmp_dirs(tmp_path / "run", older_than=0.0) == [fresh]
