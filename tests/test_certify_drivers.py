"""The certifier through every driver: `--estimator certify` in evaluate_margin.py (in process), the same rows,
chunks, processes and resume as DeepFool and FMN; compare_margins.py's interval of a certified folder and an
attack's folder; scripts/certify_study.py on tiny checkpoints.

References: DeepFool's margins on the same rows (every converged DeepFool row is a real label change, so a certified
bound above it would be wrong); an uninterrupted single-process run (bit for bit); medians and ratios recomputed
with numpy from the arrays written.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import compare_margins
from margins import MarginReport, write_report


def _folder(path: Path, margins: np.ndarray, estimator: str, indices: np.ndarray, converged=None) -> Path:
    converged = np.ones(margins.shape, bool) if converged is None else converged
    settings = {"estimator": estimator, "model": {"net": "lenet"}, "dataset": "mnist", "transform": "none"}
    write_report(path, MarginReport(margins, converged, indices, settings), figure=False)
    return path


def test_compare_margins_shows_the_interval_of_a_certified_and_an_attack_folder(tmp_path, capsys):
    rng = np.random.default_rng(0)
    attack = rng.uniform(1, 10, size=(5, 30)).astype(np.float32)
    lower = (attack * rng.uniform(0.05, 0.5, size=attack.shape)).astype(np.float32)
    indices = np.arange(30) * 7
    order = rng.permutation(30)  # the same samples in another column order: aligned by dataset index
    converged = np.ones(attack.shape, bool)
    converged[2, :4] = False  # no label change found: not an upper bound, left out of the row ratios
    certified = _folder(tmp_path / "certified", lower, "certify", indices)
    fmn = _folder(tmp_path / "fmn", attack[:, order], "fmn", indices[order], converged[:, order])
    out = tmp_path / "cmp"
    assert compare_margins.main([str(certified), str(fmn), "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader((out / "interval.csv").open()))
    assert len(rows) == 5 and (out / "interval.png").is_file()
    for s, row in enumerate(rows):
        keep = converged[s]
        assert row["lower_run"] == "certified" and row["upper_run"] == "fmn"
        assert float(row["lower_median"]) == pytest.approx(np.median(lower[s].astype(np.float64)))
        assert float(row["upper_median"]) == pytest.approx(np.median(attack[s].astype(np.float64)))
        assert float(row["median_ratio"]) == pytest.approx(np.median(lower[s]) / np.median(attack[s]), rel=1e-6)
        ratios = lower[s, keep].astype(np.float64) / attack[s, keep]
        assert float(row["row_ratio_median"]) == pytest.approx(np.median(ratios))
        assert int(row["rows"]) == keep.sum() and int(row["lower_above_upper"]) == 0
    assert "certified lower bound (certified) <= true margin <= FMN margin (fmn)" in printed
    first = f"{np.median(lower[0].astype(np.float64)):16.4g}"
    assert any(line.startswith(f"       0  {first}") for line in printed.splitlines())
    assert "median certified lower bound" in printed  # the comparison lines name what each run holds


def test_a_certified_bound_above_an_attack_margin_is_counted(tmp_path, capsys):
    attack = np.full((2, 4), 2.0, np.float32)
    lower = np.array([[1.0, 1.0, 3.0, 1.0], [1.0, 1.0, 1.0, 1.0]], np.float32)  # one contradicted certificate
    certified = _folder(tmp_path / "c", lower, "certify", np.arange(4))
    deepfool = _folder(tmp_path / "d", attack, "deepfool", np.arange(4))
    assert compare_margins.main([str(deepfool), str(certified), "--output-dir", str(tmp_path / "o")]) == 0
    rows = list(csv.DictReader((tmp_path / "o" / "interval.csv").open()))
    assert [int(r["lower_above_upper"]) for r in rows] == [1, 0]
    assert "1 of 4 rows" in capsys.readouterr().out


def test_no_interval_for_folders_of_other_samples_or_two_attacks(tmp_path):
    margins = np.ones((2, 4), np.float32)
    a = _folder(tmp_path / "a", margins, "deepfool", np.arange(4))
    b = _folder(tmp_path / "b", margins, "fmn", np.arange(4))
    c = _folder(tmp_path / "c", margins * 0.5, "certify", np.arange(4) + 10)
    assert compare_margins.main([str(a), str(b), str(c), "--output-dir", str(tmp_path / "o")]) == 0
    assert not (tmp_path / "o" / "interval.csv").exists() and (tmp_path / "o" / "comparison.csv").exists()
    assert json.loads((c / "summary.json").read_text())["settings"]["estimator"] == "certify"
