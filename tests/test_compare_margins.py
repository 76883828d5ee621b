"""compare_margins.py and the per-sample CSV export, on small result folders written by write_margin_results.

Reference for the Wilcoxon p-value: the exact two-sided null distribution for n pairs that all differ in the same
direction, p = 2 / 2^n (no scipy call on our side).
"""

from __future__ import annotations

import csv

import numpy as np
import pytest

import compare_margins
from analysis.compare import compare_runs, load_runs
from analysis.export import COLUMNS, export_per_sample_csv
from common.errors import InputError
from margins.results import write_margin_results


def make_run(path, margins, indices):
    margins = np.asarray(margins, dtype=np.float32)
    write_margin_results(path, margins, np.ones(margins.shape, bool), np.asarray(indices), {"test": True}, figure=False)
    return path


@pytest.fixture
def base():
    rng = np.random.default_rng(0)
    return rng.uniform(0.5, 2.0, size=(3, 8)).astype(np.float32), np.arange(10, 18)


def test_paired_wilcoxon_ratio_and_column_alignment(tmp_path, base):
    margins, indices = base
    order = np.random.default_rng(1).permutation(8)  # same samples, another column order
    a = make_run(tmp_path / "a", margins, indices)
    b = make_run(tmp_path / "b", 2 * margins[:, order], indices[order])
    rows = compare_runs(load_runs([a, b]))
    for row in (r for r in rows if r["run"] == "b"):
        assert row["ratio_to_reference"] == pytest.approx(2.0)
        assert row["paired_samples"] == 8
        assert row["wilcoxon_p"] == pytest.approx(2 / 2**8)  # every pair increases: exact two-sided p


def test_unshared_samples_get_a_note_and_no_p(tmp_path, base):
    margins, indices = base
    a = make_run(tmp_path / "a", margins, indices)
    b = make_run(tmp_path / "b", margins, indices + 100)
    row = [r for r in compare_runs(load_runs([a, b])) if r["run"] == "b"][0]
    assert np.isnan(row["wilcoxon_p"]) and "samples differ" in row["note"]


def test_different_subspace_counts_raise(tmp_path, base):
    margins, indices = base
    with pytest.raises(InputError, match="different numbers of subspaces"):
        load_runs([make_run(tmp_path / "a", margins, indices), make_run(tmp_path / "b", margins[:2], indices)])


def test_cli_writes_csv_and_figure(tmp_path, base, capsys):
    margins, indices = base
    a, b = make_run(tmp_path / "a", margins, indices), make_run(tmp_path / "b", 3 * margins, indices)
    out = tmp_path / "cmp"
    assert compare_margins.main([str(a), str(b), "--names", "std", "x3", "--output-dir", str(out)]) == 0
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert len(rows) == 6 and {r["run"] for r in rows} == {"std", "x3"}
    assert float([r for r in rows if r["run"] == "x3"][0]["ratio_to_reference"]) == pytest.approx(3.0)
    assert (out / "comparison.png").stat().st_size > 1000
    assert compare_margins.main([str(a), str(tmp_path / "missing")]) == 2
    assert "error:" in capsys.readouterr().err


def test_export_with_and_without_optional_files(tmp_path, base):
    margins, indices = base
    run = make_run(tmp_path / "a", margins, indices)
    rows = list(csv.DictReader(export_per_sample_csv(run).open()))
    assert tuple(rows[0]) == COLUMNS and len(rows) == 24
    assert rows[9]["sample_index"] == "11" and rows[9]["subspace"] == "1" and rows[9]["iterations"] == ""
    assert float(rows[9]["margin"]) == pytest.approx(float(margins[1, 1]))
    np.save(run / "iterations.npy", np.arange(24).reshape(3, 8))
    np.save(run / "labels.npy", np.arange(8) % 10)
    assert compare_margins.main(["--export-csv", str(run), "--output", str(tmp_path / "x.csv")]) == 0
    rows = list(csv.DictReader((tmp_path / "x.csv").open()))
    assert rows[9]["iterations"] == "9" and rows[9]["label"] == "1" and rows[9]["predicted"] == ""
    np.save(run / "perturbed_labels.npy", np.zeros((2, 8), int))
    with pytest.raises(InputError, match="perturbed_labels.npy has shape"):
        export_per_sample_csv(run)


@pytest.fixture(scope="module")
def synthetic_ckpt(tmp_path_factory):
    """A LeNet briefly trained on 1x16x16 synthetic data (no dataset files needed), as a Lightning checkpoint."""
    import lightning as L
    import torch

    from datamodules import SyntheticDataModule
    from lightning_modules import ClassifierModule

    torch.manual_seed(0)
    data = SyntheticDataModule(image_shape=(1, 16, 16), num_train=256, num_test=32, eps=4.0, sigma=1.0, batch_size=64)
    module = ClassifierModule(net="lenet", num_classes=2, image_shape=(1, 16, 16), lr=0.05, schedule="constant")
    trainer = L.Trainer(max_steps=8, limit_val_batches=0, num_sanity_val_steps=0, logger=False, accelerator="cpu",
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, datamodule=data)
    path = tmp_path_factory.mktemp("ckpt") / "synthetic.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_frequency_analysis_cli_end_to_end(synthetic_ckpt, tmp_path):
    """map2d / random / heatmap on a real checkpoint; outputs read back and cross-checked against each other."""
    import json

    import frequency_analysis

    common = ["--checkpoint", str(synthetic_ckpt), "--num-samples", "4", "--max-iter", "20", "--no-progress"]
    out = tmp_path / "m"
    assert frequency_analysis.main(["map2d", *common, "--block", "8", "--stride", "4", "--output-dir", str(out)]) == 0
    margins = np.load(out / "margins.npy")
    assert margins.shape == (9, 4) and np.load(out / "iterations.npy").shape == (9, 4)
    np.testing.assert_allclose(np.load(out / "map2d.npy"), np.median(margins, axis=1).reshape(3, 3), rtol=1e-6)
    assert (out / "map2d.png").is_file()
    rows = list(csv.DictReader(export_per_sample_csv(out).open()))
    assert len(rows) == 36 and all(r["iterations"] and r["predicted"] and r["perturbed_label"] for r in rows)
    out = tmp_path / "r"
    assert frequency_analysis.main(["random", *common, "--count", "3", "--output-dir", str(out)]) == 0
    spreads = json.loads((out / "analysis.json").read_text())["spread_max_over_min_median"]
    assert np.load(out / "random" / "margins.npy").shape == (3, 4) and set(spreads) == {"dct", "random"}
    out = tmp_path / "h"
    assert frequency_analysis.main(["heatmap", *common, "--eps", "2", "--output-dir", str(out)]) == 0
    heat = np.load(out / "heatmap.npy")
    settings = json.loads((out / "heatmap.json").read_text())
    assert heat.shape == (16, 16) and settings["eps"] == 2.0 and settings["valid"] == "box"
    np.testing.assert_allclose(heat, np.roll(heat[::-1, ::-1], (1, 1), axis=(0, 1)))  # U(i, j) = U(-i, -j)
