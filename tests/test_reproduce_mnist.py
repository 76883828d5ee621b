"""A short run of scripts/reproduce_mnist.py on the real MNIST that checks the paper's qualitative claims."""

from __future__ import annotations

import pytest

from scripts import reproduce_mnist


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


def _result(name: str, title: str, low: float, high: float, minutes: float) -> dict:
    return {
        "name": name, "title": title, "clean_accuracy": 0.98, "test_samples": 10000, "pgd_accuracy": 0.7,
        "pgd_eps": 2.0, "pgd_samples": 1000, "not_converged": 0, "train_seconds": 60 * minutes,
        "median_margin": [low, high], "low_band_median": low, "high_band_median": high,
    }  # fmt: skip


def test_both_flipped_robust_variants_are_compared_in_the_results_page():
    """The exact and the Dykstra flipped robust LeNets: one claim row each per flipped-robust claim (ratios of band
    medians, computed by hand here), a row each in the tables, and the note comparing their training times."""
    from scripts.results_doc import render

    results = {
        "mnist_flipped_lenet": _result("mnist_flipped_lenet", "Flipped", 20.0, 4.0, 2.0),
        "mnist_flipped_robust_lenet": _result("mnist_flipped_robust_lenet", "Exact", 200.0, 5.0, 8.0),
        "mnist_flipped_robust_lenet_dykstra": _result(
            "mnist_flipped_robust_lenet_dykstra", "Dykstra", 300.0, 6.0, 16.0
        ),
    }
    claims = reproduce_mnist.claims(results)
    assert claims["flipped_robust_over_flipped_high"] == 5.0 / 4.0
    assert claims["flipped_robust_dykstra_over_flipped_high"] == 6.0 / 4.0
    assert claims["flipped_robust_low_over_high"] == 40.0 and claims["flipped_robust_dykstra_low_over_high"] == 50.0
    page = render({"results": results, "claims": claims, "settings": {"epochs": 10, "num_samples": 100, "seed": 0},
                   "seconds": 1800, "torch": "2.x"})  # fmt: skip
    assert "| Exact | 0.9800 (10000)" in page and "| Dykstra | 0.9800 (10000)" in page
    assert "| 1.50x | yes (> 1.2) |" in page and "| 50.00x | yes (> 3) |" in page
    assert "exact 8.0 min" in page and "Dykstra 16.0 min" in page and "REFERENCE" not in page
    experiment_names = {e.name for e in reproduce_mnist.EXPERIMENTS}
    assert {"mnist_flipped_robust_lenet", "mnist_flipped_robust_lenet_dykstra"} <= experiment_names
    dykstra = next(e for e in reproduce_mnist.EXPERIMENTS if e.name == "mnist_flipped_robust_lenet_dykstra")
    assert dykstra.config_name == "mnist_flipped_robust_lenet" and "dykstra" in dykstra.overrides
