"""scripts/certify_study.py on tiny checkpoints in the reproduction's layout: every number of its section comes from
the result folders its summary names, a claim's verdict follows the certified bounds on one side and the attack's
margins on the other, finished measurements are reused (its own, or estimator_study.py's), and the section is
written in place on the results page.

References: the result folders read back with `read_report` and the numbers recomputed from them with numpy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from margins import MarginReport, read_report
from models import build_model
from scripts import certify_study
from scripts.results_doc import CLAIMS
from tests.conftest import write_idx_mnist

SLOW = pytest.mark.slow  # the `study` fixture: 18 measurements of 9 rows, 80 s on a shared 2-core machine
PAGE = """# Results

## Beyond the paper

Something.

## How tight are DeepFool's margins?

The FMN section.
"""


def _checkpoint(path: Path, data: Path, seed: int) -> None:
    """A Lightning-style checkpoint of an untrained LeNet (its own seed) with its datamodule's hyperparameters."""
    torch.manual_seed(seed)
    checkpoint = {
        "state_dict": {f"model.net.{k}": v for k, v in build_model("lenet").state_dict().items()},
        "hyper_parameters": {"net": "lenet", "num_classes": 10, "image_shape": (1, 28, 28)},
        "datamodule_hyper_parameters": {"dataset": "mnist", "data_dir": str(data), "transform": "none"},
    }
    path.parent.mkdir(parents=True)
    torch.save(checkpoint, path)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("certify_study")
    data = write_idx_mnist(root / "data")
    for seed, kind in enumerate(("standard", "robust")):
        name = certify_study.MODELS[kind][0]
        _checkpoint(root / "reproduction" / "logs" / name / "reproduce" / "checkpoints" / "last.ckpt", data, seed)
    (root / "RESULTS.md").write_text(PAGE)
    argv = ["--reproduction", str(root / "reproduction"), "--data-dir", str(data), "--out", str(root / "out"),
            "--estimator-study", str(root / "estimator_study"), "--num-samples", "3", "--subspace-step", "10",
            "--fmn-steps", "5", "--models", "standard", "robust", "--docs",
            "--page", str(root / "RESULTS.md")]  # fmt: skip
    summary = certify_study.main(argv)
    return SimpleNamespace(root=root, argv=argv, summary=summary)


@SLOW
def test_every_number_comes_from_the_named_result_folders(study):
    summary = json.loads((study.root / "out" / "summary.json").read_text())
    assert summary["num_subspaces"] == 3  # 8x8 blocks at 0, 10, 20
    for model in summary["models"].values():
        reports = {e: read_report(Path(f)) for e, f in model["folders"].items()}
        assert {e: r.settings["estimator"] for e, r in reports.items()} == {e: e for e in certify_study.ESTIMATORS}
        assert reports["certify"].settings["bound"] == "lower"
        for estimator, report in reports.items():
            expected = np.median(report.margins.astype(np.float64), axis=1)
            np.testing.assert_allclose(model["per_subspace"]["median"][estimator], expected)
        certified, fmn = reports["certify"], reports["fmn"]
        np.testing.assert_array_equal(certified.indices, fmn.indices)
        for s, ratio in enumerate(model["per_subspace"]["lower_over_fmn"]):
            rows = fmn.converged[s]
            assert ratio == pytest.approx(
                np.median(certified.margins[s, rows].astype(np.float64) / fmn.margins[s, rows])
            )
        assert model["per_subspace"]["lower_above_upper"] == 0


@SLOW
def test_claims_compare_certified_bounds_on_one_side_with_attack_margins_on_the_other(study):
    folders = {kind: m["folders"] for kind, m in study.summary["models"].items()}
    decided = {c.key: c for c in CLAIMS["mnist"] if {c.numerator[0], c.denominator[0]} <= set(folders)}
    rows = {row["key"]: row for row in study.summary["claims"]}
    assert set(rows) == {k for k, c in decided.items() if {c.numerator[1], c.denominator[1]} <= {"low", "high"}}
    assert "robust_over_standard_low" in rows and "standard_high_over_low" in rows
    for key, row in rows.items():
        claim = decided[key]
        (a_kind, a_band), (b_kind, b_band) = claim.numerator, claim.denominator
        lower = read_report(Path(folders[a_kind]["certify"])).margins.astype(np.float64)
        lower_a = lower[:1] if a_band == "low" else lower[-1:]  # 3 subspaces: a band is one subspace
        for attack in ("deepfool", "fmn"):
            report = read_report(Path(folders[b_kind][attack]))
            upper = np.where(report.converged, report.margins.astype(np.float64), np.inf)  # no label change: no bound
            upper_b = upper[:1] if b_band == "low" else upper[-1:]
            ratio = np.median(lower_a) / np.median(upper_b)
            assert row[attack]["ratio"] == pytest.approx(ratio)
            assert row[attack]["holds"] == (ratio > claim.threshold)
            per_sample = (lower_a[0] > claim.threshold * upper_b[0]).mean()
            assert row[attack]["fraction_of_samples"] == pytest.approx(per_sample)


@SLOW
def test_the_section_is_written_in_place_before_the_fmn_section(study):
    page = (study.root / "RESULTS.md").read_text()
    assert page.count(certify_study.SECTION) == 1
    assert page.index("## Beyond the paper") < page.index(certify_study.SECTION) < page.index("## How tight")
    section = page[page.index(certify_study.SECTION) : page.index("## How tight")]
    medians = study.summary["models"]["standard"]["per_subspace"]["median"]
    first = f"| 0 | {medians['certify'][0]:.3g} | {medians['fmn'][0]:.3g} | {medians['deepfool'][0]:.3g} |"
    assert first in section
    assert str(study.root / "out" / "summary.json") in section


@SLOW
def test_finished_measurements_are_reused_and_the_section_replaced(study, monkeypatch):
    name = certify_study.MODELS["standard"][0]
    moved = study.root / "estimator_study" / name / "fmn"
    moved.parent.mkdir(parents=True)
    shutil.move(study.root / "out" / name / "fmn", moved)  # estimator_study.py's finished FMN folder

    def refuse(*args, **kwargs):
        raise AssertionError("a finished measurement was measured again")

    monkeypatch.setattr(certify_study, "evaluate_margins", refuse)
    summary = certify_study.main(study.argv)
    assert summary["models"]["standard"]["folders"]["fmn"] == str(moved)
    assert summary["models"]["standard"]["per_subspace"] == study.summary["models"]["standard"]["per_subspace"]
    assert summary["claims"] == study.summary["claims"]
    page = (study.root / "RESULTS.md").read_text()
    assert page.count(certify_study.SECTION) == 1 and page.endswith("The FMN section.\n")


def test_a_row_without_label_change_bounds_nothing():
    """Hand-made reports of 4 samples x 9 subspaces (bands of 3): standard's high band certified at 10, its low band's
    attack margins 2, except sample 0's, where the attack changed no label (its margin 1 is no bound)."""

    def report(margins: np.ndarray, converged: np.ndarray | None = None) -> MarginReport:
        converged = np.ones(margins.shape, bool) if converged is None else converged
        return MarginReport(margins, converged, np.arange(4), {})

    certified = np.full((9, 4), 10.0)
    attack = np.full((9, 4), 2.0)
    attack[:3, 0] = 1.0
    missed = np.ones((9, 4), bool)
    missed[:3, 0] = False
    reports = {"standard": {"certify": report(certified), "deepfool": report(attack, missed), "fmn": report(attack)}}
    (row,) = certify_study.claims(reports)
    assert row["key"] == "standard_high_over_low" and row["certified_A"] == 10.0
    assert row["deepfool"]["fraction_of_samples"] == 0.75 and row["deepfool"]["rows_without_label_change"] == 3
    assert row["fmn"]["fraction_of_samples"] == 1.0 and row["fmn"]["ratio"] == pytest.approx(10.0 / 2.0)
    assert row["deepfool"]["ratio"] == pytest.approx(10.0 / 2.0) and row["deepfool"]["holds"]  # the median: 2
