"""A run is named by what it is: the default folder of a non-default estimator differs from DeepFool's (which keeps
its name), figures and terminal summaries name the estimator, a refusal says what the folder holds, and figures of
random subspaces do not claim a frequency order.

References: `margins.inputs.default_output_dir` (the DeepFool name, unchanged), the settings the runs themselves
record (summary.json), the figures' own artists."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import evaluate_margin
import frequency_analysis
from margins import MarginReport, read_report
from margins.inputs import ModelSource, default_output_dir, load_source
from margins.run.evaluate import job_from_checkpoint
from margins.settings import AttackSettings, RowSettings
from margins.store.names import describe_held
from margins.store.results import _figure_arguments
from models import build_model
from plotting.margins import plot_margins
from tests.conftest import write_idx_mnist


@pytest.fixture(scope="module")
def lenet(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("names")
    write_idx_mnist(root / "data")
    torch.manual_seed(0)
    torch.save(build_model("lenet").state_dict(), root / "lenet.t7")
    return SimpleNamespace(root=root, data=root / "data", ckpt=root / "lenet.t7")


def _argv(s: SimpleNamespace, estimator: str, *more) -> list[str]:
    """3 samples x 2 subspaces (8x8 blocks at 0 and 20): one chunk."""
    return [
        "--model", "lenet", "--dataset", "mnist", "--checkpoint", str(s.ckpt), "--data-dir", str(s.data),
        "--num-samples", "3", "--subspace-step", "20", "--estimator", estimator, "--fmn-steps", "5",
        "--max-iter", "20", "--accelerator", "cpu", "--no-progress", *map(str, more),
    ]  # fmt: skip


def _main(argv: list[str], capsys) -> tuple[int, str, str]:
    code = evaluate_margin.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def fmn_folder(lenet) -> tuple[Path, str]:
    out = lenet.root / "fmn"
    with pytest.MonkeyPatch.context() as mp:  # capsys is function-scoped: capture by hand
        lines: list[str] = []
        mp.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
        assert evaluate_margin.main([*_argv(lenet, "fmn"), "--output-dir", str(out)]) == 0
    return out, "\n".join(lines)


def test_default_folders_differ_by_estimator_and_deepfools_keeps_its_name(lenet, tmp_path):
    source = ModelSource(lenet.ckpt, "lenet", "mnist", data_dir=str(lenet.data))
    loaded = load_source(source)
    deepfool_name = default_output_dir("lenet", loaded.datamodule, lenet.ckpt, root=str(tmp_path))
    folders = {}
    for estimator in ("deepfool", "fmn"):
        attack = AttackSettings(estimator=estimator)
        job = job_from_checkpoint(
            source, RowSettings(num_samples=2, subspace_step=20), attack, output_root=str(tmp_path)
        )
        folders[estimator] = job.output_dir
    assert folders["deepfool"] == deepfool_name  # existing folders keep resuming
    assert folders["fmn"] == deepfool_name.with_name(deepfool_name.name + "_fmn")


def test_an_fmn_run_records_no_deepfool_setting_and_names_itself(lenet, fmn_folder):
    folder, printed = fmn_folder
    settings = read_report(folder).settings
    manifest = json.loads((folder / "chunks" / "manifest.json").read_text())["fingerprint"]
    for recorded in (settings, manifest):
        assert recorded["estimator"] == "fmn" and recorded["estimator_settings"]["steps"] == 5
        assert "overshoot" not in recorded and "max_iter" not in recorded
    assert "3 samples, 2 subspaces, FMN margins (upper bounds on the margin)" in printed
    medians = " ".join(f"{v:.3g}" for v in np.median(read_report(folder).margins.astype(np.float64), axis=1))
    assert f"median FMN margin per subspace (low -> high frequency): {medians}" in printed


def test_figures_name_the_estimator(lenet, fmn_folder, tmp_path, capsys):
    deepfool = tmp_path / "deepfool"
    assert _main([*_argv(lenet, "deepfool"), "--output-dir", str(deepfool)], capsys)[0] == 0
    assert read_report(deepfool).settings["max_iter"] == 20  # DeepFool's own settings stay at the top level
    for folder, what in ((fmn_folder[0], "FMN margin"), (deepfool, "DeepFool margin")):
        report = read_report(folder)
        ax = plot_margins(**_figure_arguments(report, report.margins, report.converged, "lenet on mnist")).axes[0]
        assert ax.get_title().splitlines()[0] == f"lenet on mnist: {what}s"  # the title evaluate_margin.py gives
        assert ax.get_ylabel() == f"{what} (L2)" and ax.get_xlabel() == "Frequency"


def test_a_refusal_says_what_the_folder_holds(lenet, fmn_folder, tmp_path, capsys):
    finished, _ = fmn_folder
    code, out, err = _main([*_argv(lenet, "deepfool"), "--output-dir", str(finished)], capsys)
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert "already holds a finished evaluation (summary.json: FMN margins, with other settings (estimator: " in err
    assert '"fmn" there, "deepfool" now' in err and "--overwrite" in err
    code, _, err = _main([*_argv(lenet, "fmn"), "--output-dir", str(finished)], capsys)
    assert code == 2 and "(summary.json: FMN margins, with the same settings)" in err

    unfinished = tmp_path / "unfinished"
    assert _main([*_argv(lenet, "fmn"), "--output-dir", str(unfinished)], capsys)[0] == 0
    (unfinished / "summary.json").unlink()
    code, _, err = _main([*_argv(lenet, "fmn", "--fmn-steps", 6), "--output-dir", str(unfinished)], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert re.search(r"holds an unfinished evaluation: FMN margins, with other settings \(estimator_settings: ", err)


def test_describe_held_puts_the_estimator_first_and_counts_the_rest():
    before = {"a": 1, "b": 2, "c": 3, "estimator": "certify", "z": [1] * 30}
    now = {"a": 0, "b": 0, "c": 0, "estimator": "fmn", "z": [2] * 30}
    text = describe_held(before, now)
    assert text.startswith('certified lower bounds, with other settings (estimator: "certify" there, "fmn" now; a: 1')
    assert text.endswith("(+2 more))") and "..." not in describe_held({"a": 1}, {"a": 2})
    assert describe_held({}, {"estimator": "deepfool"}) == (
        'DeepFool margins, with other settings (estimator: null there, "deepfool" now)'
    )  # a folder from before the estimator was recorded held DeepFool's margins


def test_random_subspaces_are_not_labelled_by_frequency(lenet, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default folder is relative to the working directory
    argv = ["random", *_argv(lenet, "fmn", "--count", 2)]
    assert frequency_analysis.main(argv) == 0
    out = capsys.readouterr().out
    assert "max/min of per-subspace median FMN margins: DCT" in out
    (folder,) = (tmp_path / "outputs" / "frequency_analysis" / "random").iterdir()
    assert folder.name.endswith("_fmn") and (folder / "random" / "margins.png").is_file()
    axes = {}
    for family in ("dct", "random"):
        report = read_report(folder / family)
        axes[family] = plot_margins(**_figure_arguments(report, report.margins, report.converged, "")).axes[0]
    assert axes["random"].get_xlabel() == "Random subspace (no frequency order)"
    assert [t.get_text() for t in axes["random"].get_xticklabels()] == ["0", "1"]
    assert axes["dct"].get_xlabel() == "Frequency"
    assert [t.get_text() for t in axes["dct"].get_xticklabels()] == ["Low", "High"]


def test_a_user_basis_axis_says_so():
    report = MarginReport(np.ones((3, 2)), np.ones((3, 2), bool), np.arange(2), {"subspace": "basis"})
    ax = plot_margins(**_figure_arguments(report, report.margins, report.converged, "")).axes[0]
    assert ax.get_xlabel() == "User basis (in the given order)" and "Low" not in ax.get_xticklabels()
