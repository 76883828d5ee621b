"""compare_margins.py and the per-sample CSV export, on small result folders written by write_report (the one
writer of every margin command).

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
from margins.store.results import MarginReport, write_report


def make_run(path, margins, indices, **optional):
    """A result folder with the required arrays and any of iterations, perturbed_labels, predicted, targets."""
    margins = np.asarray(margins, dtype=np.float32)
    report = MarginReport(margins, np.ones(margins.shape, bool), np.asarray(indices), {"test": True}, **optional)
    write_report(path, report, figure=False)
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


def test_cli_writes_csv_and_figure_and_replaces_them_only_with_overwrite(tmp_path, base, capsys):
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

    before = (out / "comparison.csv").read_bytes()
    c = make_run(tmp_path / "c", 5 * margins, indices)
    assert compare_margins.main([str(a), str(c), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "comparison.csv exists; pass --overwrite" in err[0]
    assert (out / "comparison.csv").read_bytes() == before  # refused: nothing replaced
    assert compare_margins.main([str(a), str(c), "--output-dir", str(out), "--overwrite"]) == 0
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert {r["run"] for r in rows} == {"a", "c"}
    assert float([r for r in rows if r["run"] == "c"][0]["ratio_to_reference"]) == pytest.approx(5.0)


def test_export_with_and_without_optional_files(tmp_path, base, capsys):
    margins, indices = base
    run = make_run(tmp_path / "a", margins, indices)
    rows = list(csv.DictReader(export_per_sample_csv(run).open()))
    assert tuple(rows[0]) == COLUMNS and len(rows) == 24
    assert rows[9]["sample_index"] == "11" and rows[9]["subspace"] == "1" and rows[9]["iterations"] == ""
    assert rows[9]["label"] == "" and rows[9]["predicted"] == ""
    assert float(rows[9]["margin"]) == pytest.approx(float(margins[1, 1]))

    full = make_run(
        tmp_path / "full",
        margins,
        indices,
        iterations=np.arange(24).reshape(3, 8),
        perturbed_labels=np.full((3, 8), 7),
        predicted=np.arange(8) % 3,
        targets=np.arange(8) % 10,
    )
    assert compare_margins.main(["--export-csv", str(full), "--output", str(tmp_path / "x.csv")]) == 0
    rows = list(csv.DictReader((tmp_path / "x.csv").open()))
    assert rows[9]["iterations"] == "9" and rows[9]["label"] == "1" and rows[9]["predicted"] == "1"
    assert rows[9]["perturbed_label"] == "7" and rows[10]["label"] == "2" and rows[10]["predicted"] == "2"

    # an existing CSV is replaced only with --overwrite (the default CSV beside the run, and --output)
    assert compare_margins.main(["--export-csv", str(full), "--output", str(tmp_path / "x.csv")]) == 2
    assert "x.csv exists; pass --overwrite" in capsys.readouterr().err
    assert compare_margins.main(["--export-csv", str(run)]) == 2  # margins_per_sample.csv written above
    assert compare_margins.main(["--export-csv", str(run), "--overwrite"]) == 0
    capsys.readouterr()

    # folders of older frequency_analysis.py versions hold the true labels in labels.npy
    legacy = make_run(tmp_path / "legacy", margins, indices)
    np.save(legacy / "labels.npy", np.arange(8) % 10)
    rows = list(csv.DictReader(export_per_sample_csv(legacy).open()))
    assert rows[9]["label"] == "1" and rows[9]["predicted"] == ""
    np.save(legacy / "labels.npy", np.arange(5))
    with pytest.raises(InputError, match=r"label has shape \(5,\)"):
        export_per_sample_csv(legacy)
    np.save(run / "perturbed_labels.npy", np.zeros((3, 8), int))  # a stray file summary.json does not list
    assert {r["perturbed_label"] for r in csv.DictReader(export_per_sample_csv(run).open())} == {""}
    np.save(full / "perturbed_labels.npy", np.zeros((2, 8), int))  # a listed file changed after the commit
    with pytest.raises(InputError, match="inconsistent: perturbed_labels.npy"):
        export_per_sample_csv(full)
