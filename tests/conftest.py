"""Shared test fixtures: paths to the real data in ../shared, skipping cleanly where it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
MNIST_RAW = SHARED_DATA / "MNIST" / "raw"
SAMPLES = SHARED_DATA / "samples"


# Tests use tiny tensors: one intra-op thread avoids OpenMP spin-waits that stall small ops when the two cores
# are shared (other test processes, DDP workers); subprocesses get the same through OMP_NUM_THREADS.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def mnist_root() -> Path:
    """Root holding `MNIST/raw/` (torchvision layout); skips where the real MNIST is absent."""
    if not (MNIST_RAW / "t10k-images-idx3-ubyte").exists():
        pytest.skip(f"real MNIST not found in {MNIST_RAW} (a user's clone without ../shared/data)")
    return SHARED_DATA


@pytest.fixture
def samples_dir() -> Path:
    """`../shared/data/samples` with MNIST/, CIFAR10/ and ImageNet/ PNGs; skips where absent."""
    if not (SAMPLES / "ImageNet").is_dir():
        pytest.skip(f"sample images not found in {SAMPLES} (a user's clone without ../shared/data)")
    return SAMPLES
