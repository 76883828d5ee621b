"""The margin engine's speed ideas change nothing but float rounding; 0/0 candidates; precision options."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from attacks.deepfool import IDEAS_OFF, SubspaceDeepFool, _tf32_off, precision_record
from frequency import DCTBlockSubspaces, FullSpace
from tests.deepfool_reference import dct_block_basis, reference_deepfool

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
F64 = {"dtype": torch.float64, "device": DEVICE}
SHAPE = (1, 12, 12)


def convnet(dtype: torch.dtype = torch.float64) -> nn.Module:
    """A ResNet-like stem (conv, BatchNorm, in-place ReLU, max-pool) and a 16-channel body conv: every speed idea
    applies, and ReLU and max-pool kinks make rows take several steps."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 6, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 6 * 6, 24),
        nn.ReLU(),
        nn.Linear(24, 10),
    )
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.1, 0.1)
        model[1].running_var.uniform_(0.5, 1.5)
    return model.eval().to(device=DEVICE, dtype=dtype)


ABLATIONS = [
    {"share_first_step": False},
    {"batched_grads": True},
    {"batched_grads": False},
    {"refill": False},
    {"channels_last": True},
    {"native_stem_grad": False},
    {"unroll_small_convs": False},
    {"stem_projection": False},
    {"fold_batchnorm": False},
    {"fast_maxpool": False},
    {"channels_last_body": False},
    {"fold_batchnorm": False, "fast_batchnorm": False, "fast_maxpool": False},
    {"stem_projection": False, "batched_grads": True},
    {"share_first_step": False, "batched_grads": False, "refill": False, "native_stem_grad": False},
    {"stem_projection": False, "fold_batchnorm": False, "fast_batchnorm": False, "fast_maxpool": False},
    {"stem_projection": False, "fold_batchnorm": False, "fast_maxpool": False, "channels_last_body": False},
    IDEAS_OFF,
]


@pytest.mark.parametrize("kwargs", ABLATIONS, ids=lambda k: ",".join(f"{n}={v}" for n, v in k.items()))
def test_each_idea_switched_off_gives_the_same_margins_in_float64(kwargs):
    model, x = convnet(), torch.rand(7, *SHAPE, **F64)
    family = DCTBlockSubspaces(SHAPE, 4, 2)  # 5 subspaces, 35 rows: several pool refills at batch_size 8
    default = SubspaceDeepFool(batch_size=8)
    base = default(model, x, family)
    other = SubspaceDeepFool(batch_size=8, **kwargs)(model, x, family)
    assert (base.iterations > 1).any()  # multi-step rows exercise the pool
    torch.testing.assert_close(other.margins, base.margins, rtol=1e-10, atol=0)
    assert torch.equal(other.iterations, base.iterations) and torch.equal(other.converged, base.converged)


def test_shared_first_step_and_refill_save_model_passes():
    model, x = convnet(), torch.rand(7, *SHAPE, **F64)
    family = DCTBlockSubspaces(SHAPE, 4, 2)
    runs = {}
    for name, kwargs in {"default": {}, "unshared": {"share_first_step": False}, "fixed": {"refill": False}}.items():
        attack = SubspaceDeepFool(batch_size=8, **kwargs)
        attack(model, x, family)
        runs[name] = attack.last_stats
    # sharing: iteration 0 of the 35 rows costs 7 images (one per sample) instead of 35
    assert runs["unshared"].gradient_rows - runs["default"].gradient_rows == 35 - 7
    assert runs["default"].gradient_passes < runs["fixed"].gradient_passes
    assert runs["default"].fill > runs["fixed"].fill


class TiedTopModel(nn.Module):
    """Affine logits whose classes 0 and 1 are identical: for the top candidate's twin the gap and the
    gradient difference are both exactly zero (0/0), at every point."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        weight = torch.randn(4, 64, **F64)
        weight[1] = weight[0]
        bias = torch.tensor([3.0, 3.0, 0.0, -1.0], **F64)  # classes 0 and 1 lead at x = 0
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T + self.bias


def test_zero_gap_zero_gradient_candidate_is_ignored_not_nan():
    model = TiedTopModel()
    x = torch.zeros(2, *(1, 8, 8), **F64)
    family = DCTBlockSubspaces((1, 8, 8), 4, 4)
    result = SubspaceDeepFool()(model, x, family)
    assert result.converged.all() and (result.iterations == 1).all()  # a NaN pick would stop at margin 0
    weight, bias = model.weight.cpu(), model.bias.cpu()
    for s in range(len(family)):
        basis = dct_block_basis((1, 8, 8), 4 * s, 4)
        w = (weight[2:] - weight[0]) @ basis  # the two reachable candidates, projected
        analytic = 1.02 * torch.min((bias[2:] - bias[0]).abs() / w.norm(dim=1)).item()
        pert, iters, converged = reference_deepfool(model, x[0], basis.to(DEVICE))
        for n in range(2):
            np.testing.assert_allclose(result.margins[s, n].item(), analytic, rtol=1e-10)
            np.testing.assert_allclose(result.margins[s, n].item(), pert.norm().item(), rtol=1e-10)
        assert converged and iters == 1


def test_dtype_option_runs_a_cast_copy_and_leaves_the_model_alone():
    model, x = convnet(torch.float32), torch.rand(4, *SHAPE, device=DEVICE)
    family = DCTBlockSubspaces(SHAPE, 4, 4)
    exact = SubspaceDeepFool(dtype=torch.float64)(model, x, family)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(b.dtype == torch.float32 for b in model.buffers() if b.is_floating_point())
    assert exact.margins.dtype == torch.float64
    by_hand = SubspaceDeepFool()(convnet(torch.float64), x.double(), family)
    torch.testing.assert_close(exact.margins, by_hand.margins, rtol=1e-12, atol=0)
    single = SubspaceDeepFool(dtype=torch.float32)(convnet(torch.float64), x.double(), family)
    assert single.margins.dtype == torch.float32
    rel = (single.margins.double() - exact.margins).abs() / exact.margins
    assert rel.median() < 1e-4  # float32 rounding only
    with pytest.raises(ValueError, match="dtype"):
        SubspaceDeepFool(dtype=torch.float16)


def test_default_dtype_follows_the_model_and_casts_the_input():
    model = convnet(torch.float32)
    result = SubspaceDeepFool(max_iter=2)(model, torch.rand(2, *SHAPE, **F64), FullSpace(SHAPE))
    assert result.margins.dtype == torch.float32


def test_tf32_is_off_inside_the_attack_on_cuda_and_restored_after():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with _tf32_off(torch.device("cuda")):
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        with _tf32_off(torch.device("cpu")):  # nothing to change off CUDA
            assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_precision_record_names_dtype_tf32_device_and_torch():
    record = precision_record(torch.device("cpu"), torch.float64)
    assert record["dtype"] == "float64" and record["tf32"] is None
    assert record["device"].startswith("cpu") and record["torch"] == torch.__version__
    assert precision_record("cpu")["dtype"] == "float32"
    if torch.cuda.is_available():
        assert precision_record("cuda")["tf32"] is False


def test_clean_logits_run_in_bounded_batches():
    model, x = convnet(), torch.rand(9, *SHAPE, **F64)
    attack = SubspaceDeepFool(batch_size=4, max_iter=1)
    attack(model, x, FullSpace(SHAPE))
    assert attack.last_stats.clean_passes == 3  # ceil(9 / 4)


def mnist_test_set(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The 10,000 MNIST test images [N, 1, 28, 28] in [0, 1] and labels [N], read from the raw idx files."""
    raw = root / "MNIST" / "raw"
    images = np.fromfile(raw / "t10k-images-idx3-ubyte", dtype=np.uint8, offset=16).reshape(-1, 1, 28, 28)
    labels = np.fromfile(raw / "t10k-labels-idx1-ubyte", dtype=np.uint8, offset=8)
    return torch.from_numpy(images).float().div(255), torch.from_numpy(labels).long()


def test_real_mnist_float32_margins_equal_the_previous_engine(mnist_root):
    from models import Normalize, NormalizedModel, build_model

    torch.manual_seed(0)
    test_images, test_labels = mnist_test_set(mnist_root)  # images 100.. train the LeNet, 0..5 are measured
    model = NormalizedModel(Normalize(0.1307, 0.3081, (1, 28, 28)), build_model("lenet")).to(DEVICE)
    images, labels = test_images[100:3100].to(DEVICE), test_labels[100:3100].to(DEVICE)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for start in range(0, 3000, 100):  # 30 steps: a LeNet that classifies MNIST
        loss = nn.functional.cross_entropy(model(images[start : start + 100]), labels[start : start + 100])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    x = test_images[:6].to(DEVICE)
    family = DCTBlockSubspaces((1, 28, 28), 8, 1)
    engine = SubspaceDeepFool(max_iter=20)(model, x, family)  # a few rows would crawl to 100 steps: bound the time
    previous = SubspaceDeepFool(max_iter=20, **IDEAS_OFF)(model, x, family)
    rel = (engine.margins - previous.margins).abs() / previous.margins
    assert rel.median() < 1e-5 and (engine.iterations == previous.iterations).float().mean() > 0.95


def test_import_margins_does_not_load_matplotlib_until_plotting():
    import subprocess
    import sys

    code = (
        "import sys, margins; assert 'matplotlib' not in sys.modules, 'eager matplotlib';"
        "from margins import plot_margins, save_margin_report, read_margin_results, summarize, figure_to_array;"
        "assert 'matplotlib' in sys.modules and callable(plot_margins) and callable(summarize)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr
