"""Shared test fixtures: paths to the real data in ../shared, skipping cleanly where it is absent."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
MNIST_RAW = SHARED_DATA / "MNIST" / "raw"
SAMPLES = SHARED_DATA / "samples"


# Tests use tiny tensors: one intra-op thread avoids OpenMP spin-waits that stall small ops when the two cores
# are shared (other test processes, DDP workers); subprocesses get the same through OMP_NUM_THREADS.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The signal tests send SIGINT to the commands they start. A suite launched with SIGINT ignored (a background job of a
# non-interactive shell) would start them with it ignored too (an ignored signal stays ignored across exec, and the
# commands rightly keep it so); a handler, unlike SIG_IGN, is reset to the default in every process the tests start.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _threads_left_as_found():
    """Code that pins torch's CPU threads restores them: bit-for-bit tests compare a run with an engine called at the
    test process's count, so a count left changed by one test would fail another (under -n 2, in another file)."""
    threads = torch.get_num_threads()
    yield
    assert torch.get_num_threads() == threads, f"torch's CPU threads left at {torch.get_num_threads()}, found {threads}"


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


def write_idx_mnist(root: Path, num_train: int = 64, num_test: int = 64, seed: int = 0) -> Path:
    """A tiny generated MNIST in torchvision's raw layout (`root/MNIST/raw/*-idx?-ubyte`): 28x28 uint8 images of a
    bright square whose position encodes the label (0..9), plus noise. Returns `root`."""
    import numpy as np

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, count in (("train", num_train), ("t10k", num_test)):
        labels = (np.arange(count) % 10).astype(np.uint8)
        images = rng.integers(0, 40, size=(count, 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            r, c = 2 + 8 * (label // 4), 2 + 6 * (label % 4)
            images[i, r : r + 6, c : c + 6] = 255
        header = np.array([0x803, count, 28, 28], dtype=">i4").tobytes()
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(np.array([0x801, count], ">i4").tobytes() + labels.tobytes())
    return root


@pytest.fixture
def tiny_mnist_root(tmp_path_factory) -> Path:
    """Root holding a generated 64 + 64 image MNIST in the raw idx layout (no real data needed)."""
    return write_idx_mnist(tmp_path_factory.mktemp("tiny_mnist"))


class BoundedScoreModel(nn.Module):
    """Two classes: logits [threshold, act(<w, x>)] with act = tanh or sin; class 1 never wins when threshold > 1."""

    def __init__(self, direction: torch.Tensor, threshold: float, act=torch.tanh):
        super().__init__()
        self.register_buffer("direction", direction)
        self.threshold, self.act = threshold, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = self.act((x * self.direction).flatten(1).sum(1))
        return torch.stack([torch.full_like(score, self.threshold), score], dim=1)


def affine_model(weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """A float64 affine classifier x -> weight @ flatten(x) + bias; weight [K, D], bias [K]."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    return nn.Sequential(nn.Flatten(), linear)
