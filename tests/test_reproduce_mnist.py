"""scripts/reproduce_mnist.py (the MNIST experiment set of scripts/reproduce.py): a short run on the real MNIST that
checks the paper's qualitative claims (slow), and the flipped robust LeNet trained with the exact projection and, as
the release did, with Dykstra's: its own job, its own folders, both compared on the results page."""

from __future__ import annotations

import subprocess
from dataclasses import asdict

import pytest
import torch

from configs import config_path
from scripts import reproduce, reproduce_mnist
from scripts.results_doc import claim_values, render


@pytest.mark.slow
def test_quick_reproduction_shows_the_papers_claims(tmp_path, mnist_root, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the training subprocesses run alone: both cores
    asserted = ["mnist_lenet", "mnist_flipped_lenet", "mnist_robust_lenet", "synthetic_lenet"]  # the claims below
    argv = ["--quick", "--data-dir", str(mnist_root), "--out", str(tmp_path), "--only", *asserted]
    summary = reproduce_mnist.main(argv)
    results, claims = summary["results"], summary["claims"]
    assert (tmp_path / "summary.json").is_file() and (tmp_path / "mnist_margins.png").is_file()
    for name in ("mnist_lenet", "mnist_flipped_lenet"):
        assert results[name]["clean_accuracy"] > 0.9, results[name]
    # standard MNIST: invariant at high frequencies; flipped MNIST: the mirror image
    assert claims["standard_high_over_low"] > 3.0, claims
    assert claims["flipped_low_over_high"] > 3.0, claims
    # adversarial training: more robust, and larger margins at low frequencies
    robust, standard = results["mnist_robust_lenet"], results["mnist_lenet"]
    assert robust["pgd_accuracy"] > standard["pgd_accuracy"] + 0.1, (robust, standard)
    assert claims["robust_over_standard_low"] > 1.0, claims
    # synthetic data: small margin only along the discriminative direction (it lies in subspace 0)
    synthetic = results["synthetic_lenet"]
    assert synthetic["clean_accuracy"] > 0.9, synthetic
    assert claims["synthetic_others_min_over_direction"] > 3.0, claims


def _result(exp: reproduce.Experiment, low: float, high: float, minutes: float) -> dict:
    """An experiment's summary as scripts/reproduce.py writes it, with made-up measurements."""
    return {
        **asdict(exp), "clean_accuracy": 0.98, "test_samples": 10000, "pgd_accuracy": 0.7, "pgd_eps": 2.0,
        "pgd_samples": 1000, "not_converged": 0, "train_seconds": 60 * minutes, "trained_by": "this run",
        "trained_epochs": 10, "trained_steps": 4690, "trained_batch_size": 128,
        "median_margin": [low, high], "low_band_median": low, "high_band_median": high, "margin_samples": 100,
        "subspaces": "2 subspaces: 8x8 blocks, step 1, of 1x28x28 images", "device": "cpu",
    }  # fmt: skip


def _summary(results: dict, claims: dict) -> dict:
    """A summary of the MNIST reproduction around `results`, as scripts/reproduce.py writes it."""
    settings = {"dataset": "mnist", "epochs": 10, "num_samples": 100, "seed": 0, "train_args": ""}
    return {"settings": settings, "label": "MNIST", "command": "python scripts/reproduce.py --dataset mnist",
            "seconds": 1800, "torch": "2.x", "device": "margins on CPU", "figure": "mnist_margins.png",
            "per_net_claims": False, "results": results, "claims": claims}  # fmt: skip


def test_both_flipped_robust_variants_are_compared_in_the_results_page():
    """The exact and the Dykstra flipped robust LeNets: one claim row each per flipped-robust claim (ratios of band
    medians, computed by hand here), a row each in the tables, and the note comparing their training times."""
    experiments = {e.name: e for e in reproduce.experiments("mnist")}
    assert {"mnist_flipped_robust_lenet", "mnist_flipped_robust_lenet_dykstra"} <= set(experiments)
    exact, dykstra = experiments["mnist_flipped_robust_lenet"], experiments["mnist_flipped_robust_lenet_dykstra"]
    assert exact.kind == "flipped_robust" and exact.config_name == exact.name and not exact.overrides
    assert dykstra.kind == "flipped_robust_dykstra" and dykstra.robust and dykstra.flipped
    assert dykstra.config_name == "mnist_flipped_robust_lenet" and "dykstra" in dykstra.overrides
    assert "(exact projection)" in exact.title and "(Dykstra, the release's)" in dykstra.title

    results = {
        "mnist_flipped_lenet": _result(experiments["mnist_flipped_lenet"], 20.0, 4.0, 2.0),
        "mnist_flipped_robust_lenet": _result(exact, 200.0, 5.0, 8.0),
        "mnist_flipped_robust_lenet_dykstra": _result(dykstra, 300.0, 6.0, 16.0),
    }
    claims = claim_values(results, "mnist", per_net=False)
    assert claims["flipped_robust_over_flipped_high"] == 5.0 / 4.0
    assert claims["flipped_robust_dykstra_over_flipped_high"] == 6.0 / 4.0
    assert claims["flipped_robust_low_over_high"] == 40.0 and claims["flipped_robust_dykstra_low_over_high"] == 50.0
    page = render(_summary(results, claims))
    assert f"| {exact.title} | 0.9800 (10000)" in page and f"| {dykstra.title} | 0.9800 (10000)" in page
    assert "| 1.25x | yes (> 1.2) |" in page and "| 40.00x | yes (> 3) |" in page  # exact
    assert "| 1.50x | yes (> 1.2) |" in page and "| 50.00x | yes (> 3) |" in page  # Dykstra
    assert "| mnist_flipped_robust_lenet | mnist_flipped_robust_lenet_dykstra |" in page  # the median table
    assert "exact 10 epochs, 4690 steps, 8.0 min" in page and "Dykstra 10 epochs, 4690 steps, 16.0 min" in page
    assert "10 epochs per model (4690 optimizer steps) instead of the release's 30 (3 trainings, 2 of them " in page
    assert "adversarial, 26.0 min of training in all)" in page and "REFERENCE" not in page
    del results["mnist_flipped_robust_lenet_dykstra"]  # one of them ran: no comparison
    page = render(_summary(results, claim_values(results, "mnist", per_net=False)))
    assert "Exact projection vs Dykstra" not in page
    assert "Not checked in this run" in page and "flipped_robust_dykstra_low_over_high" in page


@pytest.mark.parametrize("launcher", ["sbatch", "torchrun"])
def test_the_dykstra_variant_is_its_config_with_an_override_in_its_own_folders(tmp_path, launcher):
    """A cluster job of the variant trains the flipped robust config with Dykstra's projection into its own logs
    folder and measures its own checkpoint into its own margins folder."""
    name = "mnist_flipped_robust_lenet_dykstra"
    argv = ["--dataset", "mnist", "--out", str(tmp_path), "--emit", launcher, "--only", name]
    assert reproduce_mnist.main(argv) == {}
    (job,) = (tmp_path / "jobs").iterdir()
    script = job.read_text()
    (train,) = [line for line in script.splitlines() if " -m train fit " in line]
    assert f"--config {config_path('mnist_flipped_robust_lenet')} " in train
    assert f"--trainer.logger.init_args.name {name} " in train and "--model.init_args.projection dykstra" in train
    ckpt = tmp_path / "logs" / name / "reproduce" / "checkpoints" / "last.ckpt"
    assert f"CKPT={ckpt}" in script and f"--checkpoint {ckpt} " in script
    assert f"--output-dir {tmp_path / 'margins' / name} " in script
    assert subprocess.run(["bash", "-n", str(job)]).returncode == 0


def test_the_dykstra_variant_trains_with_dykstras_projection(tmp_path, tiny_mnist_root):
    """End to end on tiny MNIST: the variant's run trains with `projection: dykstra` in its own folder, is measured
    and gets its claims; the exact run is left alone."""
    name = "mnist_flipped_robust_lenet_dykstra"
    tiny = "--trainer.max_steps 2 --trainer.limit_val_batches 1 --trainer.num_sanity_val_steps 0 --data.batch_size 16"
    argv = ["--data-dir", str(tiny_mnist_root), "--out", str(tmp_path), "--in-process", "--num-samples", "2",
            "--robust-samples", "16", f"--train-args={tiny}", "--margin-args=--max-iter 2",
            "--only", "mnist_flipped_lenet", name]  # fmt: skip
    summary = reproduce_mnist.main(argv)
    result = summary["results"][name]
    ckpt = tmp_path / "logs" / name / "reproduce" / "checkpoints" / "last.ckpt"
    assert result["checkpoint"] == str(ckpt) and result["pgd_samples"] == 16
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["hyper_parameters"]["projection"] == "dykstra"
    assert not (tmp_path / "logs" / "mnist_flipped_robust_lenet").exists()
    assert {"flipped_robust_dykstra_over_flipped_high", "flipped_robust_dykstra_low_over_high"} <= set(
        summary["claims"]
    )
    assert "(Dykstra, the release's)" in (tmp_path / "RESULTS-mnist.md").read_text()
