"""The results page of scripts/reproduce.py describes its own run only: a 2-model, 2-epoch run on tiny MNIST, its
page parsed back, every figure compared with the files it names (the run's summary.json, the margin folders'
margins.npy, the checkpoints), and no note about an experiment that did not run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from scripts import reproduce
from scripts.results_doc import CLAIMS

TRAIN_IMAGES, BATCH, EPOCHS = 64, 16, 2  # tiny_mnist_root's training split; steps per model = 64 / 16 * 2


def row(page: str, first_cell: str) -> list[str]:
    """The cells of the table row starting with `first_cell`."""
    (line,) = [line for line in page.splitlines() if line.startswith(f"| {first_cell} |")]
    return [cell.strip() for cell in line.strip("|").split("|")]


def band_ratio(margins: np.ndarray, numerator: str, denominator: str) -> float:
    """Ratio of band medians: the 3 lowest / highest subspaces, over all samples."""
    band = {"low": margins[:3], "high": margins[-3:]}
    return float(np.median(band[numerator]) / np.median(band[denominator]))


@pytest.mark.timeout(900)
def test_the_page_of_a_two_model_run_gives_that_runs_figures_only(tmp_path, tiny_mnist_root):
    names = ["mnist_lenet", "mnist_flipped_lenet"]
    train = f"--trainer.limit_val_batches 1 --trainer.num_sanity_val_steps 0 --data.batch_size {BATCH}"
    argv = ["--dataset", "mnist", "--data-dir", str(tiny_mnist_root), "--out", str(tmp_path), "--in-process",
            "--epochs", str(EPOCHS), "--num-samples", "3", "--robust-samples", "8", f"--train-args={train}",
            "--margin-args=--max-iter 3", "--only", *names]  # fmt: skip
    reproduce.main(argv)
    page = (tmp_path / "RESULTS-mnist.md").read_text()

    # the records the page names, read back
    (source,) = re.findall(r"from its records `([^`]+)`", page)
    summary = json.loads(Path(source).read_text())
    assert Path(source) == tmp_path / "summary.json" and list(summary["results"]) == names
    margins = {n: np.load(Path(summary["results"][n]["margin_dir"]) / "margins.npy") for n in names}
    checkpoints = {n: torch.load(summary["results"][n]["checkpoint"], weights_only=False) for n in names}

    # training: models, epochs and steps as the checkpoints record them (and as the tiny data implies)
    steps = TRAIN_IMAGES // BATCH * EPOCHS
    for n in names:
        assert (checkpoints[n]["epoch"] + 1, checkpoints[n]["global_step"]) == (EPOCHS, steps)
    assert f"2 models trained, {EPOCHS} epochs ({steps} optimizer steps) each" in page
    assert f"- **Training length.** {EPOCHS} epochs per model ({steps} optimizer steps) instead of the release's 30 (2 "
    assert f"margins of {margins[names[0]].shape[1]} random test samples" in page
    assert "DeepFool, overshoot 0.02, at most 3 iterations." in page and f"(SGD, batch {BATCH}, " in page

    # the accuracy table: the summary's figures and the training each checkpoint records
    for n in names:
        r = summary["results"][n]
        clean, pgd, not_converged, training = row(page, r["title"])[1:]
        assert clean == f"{r['clean_accuracy']:.4f} ({r['test_samples']})" and r["test_samples"] == 64
        assert pgd == f"{r['pgd_accuracy']:.4f} (eps 2, 8)"
        assert not_converged == str(r["not_converged"])
        assert training.startswith(f"{EPOCHS} epochs, {steps} steps, ")

    # the claims table: ratios of band medians recomputed from margins.npy
    expected = {
        "standard_high_over_low": band_ratio(margins["mnist_lenet"], "high", "low"),
        "flipped_low_over_high": band_ratio(margins["mnist_flipped_lenet"], "low", "high"),
    }
    claims = {c.key: c for c in CLAIMS["mnist"]}
    for key, value in expected.items():
        assert row(page, claims[key].text)[2] == f"{value:.2f}x"
    claim_rows = [line for line in page.splitlines() if re.match(r"\| .* \| \d+\.\d\dx \| (yes|no) ", line)]
    assert len(claim_rows) == len(expected)  # no claim of an experiment that did not run

    # the median table: one row per subspace, each cell the median over samples of margins.npy
    for s in range(margins[names[0]].shape[0]):
        cells = row(page, str(s))[1:]
        assert cells == [f"{np.median(margins[n][s]):.2f}" for n in names]

    # nothing about a run it did not make
    other_runs = ("seven trainings", "10 epochs", "Synthetic", "Low-pass", "Dykstra", "Adversarial training")
    for absent in (*other_runs, "release's settings"):
        assert absent not in page, absent
