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
