"""The margin engine: its ablation switches and kernels change nothing but float rounding; the prepared model;
0/0 candidates; precision options."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import fx, nn

from attacks.common import precision_record, tf32_off
from attacks.deepfool import SubspaceDeepFool
from attacks.estimator import PassStats
from attacks.kernels import KERNELS, PreparedModel, prepare_model, resolve_kernels
from attacks.reference import dct_block_basis, reference_deepfool
from frequency import DCTBlockSubspaces, FullSpace

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CPU = torch.device("cpu")  # the kernels are CPU kernels: their ablations run there
F64 = {"dtype": torch.float64, "device": DEVICE}
SHAPE = (1, 12, 12)
ON_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def convnet(dtype: torch.dtype = torch.float64, device: torch.device = DEVICE) -> nn.Module:
    """A ResNet-like stem (conv 1 -> 16, BatchNorm, in-place ReLU, max-pool), a narrow body conv and pool, and a
    3x3 conv over a 3x3 map: every kernel of `KERNELS` applies on the CPU (`test_every_kernel_applies_...`), and
    ReLU and max-pool kinks make rows take several steps."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),  # 16 channels: channels-last pool, stem projection (at most 16)
        nn.BatchNorm2d(16),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),  # 12 -> 6
        nn.Conv2d(16, 6, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 6 -> 3: a narrow map (strided maxima in the label check)
        nn.Conv2d(6, 8, 3, padding=1),  # a 3x3 kernel over a 3x3 map: unrolled
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 3 * 3, 24),
        nn.ReLU(),
        nn.Linear(24, 10),
    )
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.1, 0.1)
        model[1].running_var.uniform_(0.5, 1.5)
    return model.eval().to(device=device, dtype=dtype)


def family() -> DCTBlockSubspaces:
    return DCTBlockSubspaces(SHAPE, 4, 2)  # 5 subspaces of dimension 16


def counted(attack: SubspaceDeepFool) -> PassStats:
    """A `PassStats` observer attached to `attack`: it counts the passes of the calls that follow."""
    attack.observer = PassStats(attack.batch_size)
    return attack.observer


@pytest.fixture(scope="module")
def baseline():
    """The float64 CPU model, 7 images, the default engine's result (35 rows: several pool refills at batch size
    8) and the per-sample reference loop's margins, iterations and convergence flags [S, N]."""
    model = convnet(device=CPU)
    x = torch.rand(7, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    subspaces = family()
    attack = SubspaceDeepFool(batch_size=8)
    stats = counted(attack)
    default = attack(model, x, subspaces)
    assert stats.routes.get("stem", 0) > 0  # the default runs the stem projection on this model
    margins = torch.empty(len(subspaces), len(x), dtype=torch.float64)
    iterations = torch.empty(len(subspaces), len(x), dtype=torch.long)
    converged = torch.empty(len(subspaces), len(x), dtype=torch.bool)
    for s in range(len(subspaces)):
        basis = dct_block_basis(SHAPE, 2 * s, 4)
        for n in range(len(x)):
            pert, iters, flipped = reference_deepfool(model, x[n], basis)
            margins[s, n], iterations[s, n], converged[s, n] = pert.norm(), iters, flipped
    return model, x, subspaces, default, (margins, iterations, converged)


def test_every_kernel_applies_to_the_test_model():
    """Guards the ablations below: each kernel they drop is in effect in the default prepared model."""
    prepared = SubspaceDeepFool().prepare(convnet(device=CPU))
    assert prepared.kernels == frozenset(KERNELS)
    module = prepared.module
    assert isinstance(module, fx.GraphModule) and not any(isinstance(m, nn.BatchNorm2d) for m in module.modules())
    pools = [n.target.__name__ for n in module.graph.nodes if n.op == "call_function"]
    assert pools == ["max_pool2d_relu", "max_pool2d_relu"]  # both ReLU + pool pairs merged, the in-place one too
    assert all(n.kwargs["fast"] for n in module.graph.nodes if n.op == "call_function")
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3 and all("forward" in vars(m) for m in convs)  # patched convolutions
    assert prepared.stem is not None and prepared.stem.conv is convs[0]
    assert prepared.stem_projection(family(), SHAPE) is not None
    x = torch.rand(2, *SHAPE, dtype=torch.float64, requires_grad=True)
    h = torch.rand(2, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    assert type(convs[2](h).grad_fn).__name__ != "ConvolutionBackward0"  # the 3x3 map: one matmul
    assert type(convs[0](x).grad_fn).__name__ == "_StemConvBackward"  # the 1-channel stem: native gradient


def _ablation_id(spec: dict) -> str:
    def name(value):
        if isinstance(value, (str, bool)):
            return str(value)
        dropped = set(KERNELS) - set(value)
        if not dropped:
            return "all"
        return f"all-{'-'.join(sorted(dropped))}" if len(dropped) == 1 else "+".join(sorted(value)) or "none"

    return ",".join(f"{k}={name(v)}" for k, v in spec.items())


ABLATIONS = [
    *({"kernels": tuple(k for k in KERNELS if k != dropped)} for dropped in KERNELS),
    {"kernels": "off"},
    {"kernels": "auto"},
    {"kernels": KERNELS},
    {"kernels": ()},
    {"share_first_step": False},
    {"refill": False},
    {"kernels": ("stem_projection",)},  # the projection on the model as written (BatchNorm between conv and ReLU)
    {"kernels": ("pool_then_relu",)},  # merged pools on PyTorch's pooling path
    {"kernels": ("fold_batchnorm", "fast_maxpool")},  # fast pools, the in-place ReLU kept
    {"kernels": ("native_stem_grad", "unroll_small_convs"), "share_first_step": False},
    {"kernels": ("stem_projection", "pool_then_relu"), "refill": False},
    {"kernels": "off", "share_first_step": False, "refill": False},
]


@pytest.mark.parametrize("spec", ABLATIONS, ids=_ablation_id)
def test_each_ablation_gives_the_default_margins_and_the_reference_loops_in_float64(baseline, spec):
    model, x, subspaces, default, (margins, iterations, converged) = baseline
    attack = SubspaceDeepFool(batch_size=8, kernels=spec.get("kernels", "auto"))
    for switch in ("share_first_step", "refill"):
        if switch in spec:
            setattr(attack, switch, spec[switch])
    stats = counted(attack)
    result = attack(model, x, subspaces)
    assert (default.iterations > 1).any()  # multi-step rows exercise the pool
    torch.testing.assert_close(result.margins, default.margins, rtol=1e-10, atol=0)
    assert torch.equal(result.iterations, default.iterations) and torch.equal(result.converged, default.converged)
    torch.testing.assert_close(result.margins, margins, rtol=1e-10, atol=0)
    assert torch.equal(result.iterations, iterations) and torch.equal(result.converged, converged)
    names = resolve_kernels(attack.kernels, CPU)
    # the stem split needs a conv output nothing writes in place: after folding, the in-place ReLU reads it
    # unless it is merged into its pool
    stem_output_kept = "pool_then_relu" in names or "fold_batchnorm" not in names
    assert (stats.routes.get("stem", 0) > 0) == ("stem_projection" in names and stem_output_kept)
    if spec.get("kernels") in ("auto", KERNELS) and len(spec) == 1:
        assert torch.equal(result.margins, default.margins)  # the same kernels: the same bits


def test_ablation_switches_are_per_instance():
    attack = SubspaceDeepFool()
    attack.share_first_step = attack.refill = False
    other = SubspaceDeepFool()
    assert other.share_first_step and other.refill
    assert SubspaceDeepFool.share_first_step and SubspaceDeepFool.refill


def test_shared_first_step_and_refill_save_model_passes():
    model, x = convnet(), torch.rand(7, *SHAPE, **F64)
    runs = {}
    for name, switches in {"default": {}, "unshared": {"share_first_step": False}, "fixed": {"refill": False}}.items():
        attack = SubspaceDeepFool(batch_size=8)
        for switch, value in switches.items():
            setattr(attack, switch, value)
        runs[name] = counted(attack)
        attack(model, x, family())
    # sharing: iteration 0 of the 35 rows costs 7 images (one per sample) instead of 35
    assert runs["unshared"].gradient_rows - runs["default"].gradient_rows == 35 - 7
    assert runs["default"].gradient_passes < runs["fixed"].gradient_passes
    assert runs["default"].fill > runs["fixed"].fill


def test_resolve_kernels():
    assert resolve_kernels("auto", "cpu") == frozenset(KERNELS)
    assert resolve_kernels("auto", "cuda") == frozenset()  # no GPU needed to resolve
    assert resolve_kernels("auto", "meta") == frozenset()
    assert resolve_kernels("off", "cpu") == resolve_kernels("off", "cuda") == resolve_kernels((), "cuda")
    assert resolve_kernels(["fast_maxpool", "fold_batchnorm"], "cpu") == {"fast_maxpool", "fold_batchnorm"}
    with pytest.raises(ValueError, match="unknown kernels"):
        resolve_kernels(("fold_batchnorm", "channels_last"), "cpu")
    with pytest.raises(ValueError, match="'auto', 'off'"):
        resolve_kernels("fast", "cpu")
    with pytest.raises(ValueError, match="CPU kernels"):
        resolve_kernels(("fold_batchnorm",), "cuda")
    with pytest.raises(ValueError, match="CPU kernels"):
        SubspaceDeepFool(kernels=("stem_projection",)).prepare(convnet(device=CPU), device="meta")


def _outputs(result) -> tuple[torch.Tensor, ...]:
    return result.margins, result.iterations, result.converged, result.perturbed_labels, result.labels


def assert_same_results(got, expected) -> None:
    """The same bits on the CPU; on CUDA (cuDNN may pick nondeterministic backward kernels) margins to 1e-10."""
    for a, b in zip(_outputs(got), _outputs(expected), strict=True):
        if a.is_floating_point() and a.device.type == "cuda":
            torch.testing.assert_close(a, b, rtol=1e-10, atol=0)
        else:
            assert torch.equal(a, b)


def test_a_prepared_model_is_reused_across_calls_with_the_results_of_preparing_per_call():
    model, x = convnet(), torch.rand(3, *SHAPE, **F64)
    first, second = family(), DCTBlockSubspaces(SHAPE, 4, 4)  # another family object: its own stem projection
    attack = SubspaceDeepFool(batch_size=6)
    prepared = attack.prepare(model)
    assert isinstance(prepared, PreparedModel) and prepared.dtype == torch.float64 and prepared.device == DEVICE
    for subspaces in (first, second, first):
        assert_same_results(attack(prepared, x, subspaces), attack(model, x, subspaces))
    if prepared.stem is not None:
        assert prepared.stem_projection(first, SHAPE) is prepared.stem_projection(first, SHAPE)  # built once
    rows = attack.attack_rows(prepared, x, first, torch.tensor([2, 0, 1]), torch.tensor([1, 3, 0]))
    expected = attack(model, x, first)
    torch.testing.assert_close(rows.margins, expected.margins[[1, 3, 0], [2, 0, 1]], rtol=1e-10, atol=0)
    with pytest.raises(TypeError, match="already prepared"):
        attack.prepare(prepared)


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "dtypes": {k: v.dtype for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "types": [type(m) for m in model.modules()],
    }


def test_the_callers_model_is_untouched_by_prepare_and_attack():
    model = convnet(torch.float32).train()
    model[1].eval()  # a mixed state must stay exactly as it was
    model[4].training = False
    x = torch.rand(3, *SHAPE, device=DEVICE)
    before = _snapshot(model)
    attack = SubspaceDeepFool(dtype=torch.float64, max_iter=5)
    prepared = attack.prepare(model)
    result = attack(model, x, family())
    attack(prepared, x, family())
    after = _snapshot(model)
    assert after["dtypes"] == before["dtypes"] and all(
        d == torch.float32 for d in after["dtypes"].values() if d != torch.long
    )
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())  # running statistics too
    for key in ("training", "requires_grad", "types"):
        assert after[key] == before[key], key
    assert all(p.grad is None for p in model.parameters())
    assert not any("forward" in vars(m) or m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert result.margins.dtype == torch.float64
    # the working copy: the attack's dtype, eval mode (kept there), frozen
    assert prepared.dtype == torch.float64 and all(p.dtype == torch.float64 for p in prepared.parameters())
    assert not any(m.training for m in prepared.train().modules())
    assert not any(p.requires_grad for p in prepared.parameters())


def test_attack_rows_refuses_a_model_prepared_in_another_dtype():
    model, x = convnet(), torch.rand(2, *SHAPE, **F64)
    single = SubspaceDeepFool(dtype=torch.float32).prepare(model)
    assert single.dtype == torch.float32
    rows = (torch.tensor([0, 1]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="prepared in torch.float32"):
        SubspaceDeepFool(dtype=torch.float64).attack_rows(single, x, family(), *rows)
    with pytest.raises(ValueError, match="prepared in torch.float32"):
        SubspaceDeepFool(dtype=torch.float64)(single, x, family())
    # an attack without a dtype of its own runs in the prepared model's, casting the input
    result = SubspaceDeepFool(max_iter=2).attack_rows(single, x, family(), *rows)
    assert result.margins.dtype == torch.float32


@ON_CUDA
def test_on_cuda_auto_applies_no_kernel_and_runs_the_model_as_written():
    model = convnet()
    assert resolve_kernels("auto", "cuda") == frozenset()
    prepared = SubspaceDeepFool().prepare(model, "cuda")
    assert prepared.kernels == frozenset() and prepared.stem is None
    assert not isinstance(prepared.module, fx.GraphModule)
    assert [type(m) for m in prepared.module.modules()] == [type(m) for m in model.modules()]
    assert not any("forward" in vars(m) for m in prepared.module.modules())
    assert prepared.stem_projection(family(), SHAPE) is None
    x = torch.rand(4, *SHAPE, dtype=torch.float64, device="cuda")
    assert_same_results(SubspaceDeepFool()(prepared, x, family()), SubspaceDeepFool(kernels="off")(model, x, family()))
    with pytest.raises(ValueError, match="CPU kernels"):
        prepare_model(model, "cuda", kernels=("fold_batchnorm",))


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
    subspaces = DCTBlockSubspaces((1, 8, 8), 4, 4)
    result = SubspaceDeepFool()(model, x, subspaces)
    assert result.converged.all() and (result.iterations == 1).all()  # a NaN pick would stop at margin 0
    weight, bias = model.weight.cpu(), model.bias.cpu()
    for s in range(len(subspaces)):
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
    subspaces = DCTBlockSubspaces(SHAPE, 4, 4)
    exact = SubspaceDeepFool(dtype=torch.float64)(model, x, subspaces)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(b.dtype == torch.float32 for b in model.buffers() if b.is_floating_point())
    assert exact.margins.dtype == torch.float64
    by_hand = SubspaceDeepFool()(convnet(torch.float64), x.double(), subspaces)
    torch.testing.assert_close(exact.margins, by_hand.margins, rtol=1e-12, atol=0)
    single = SubspaceDeepFool(dtype=torch.float32)(convnet(torch.float64), x.double(), subspaces)
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
        with tf32_off(torch.device("cuda")):
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        with pytest.raises(RuntimeError, match="boom"), tf32_off("cuda"):
            raise RuntimeError("boom")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32  # restored on errors too
        with tf32_off(torch.device("cpu")):  # nothing to change off CUDA
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
    stats = counted(attack)
    attack(model, x, FullSpace(SHAPE))
    assert stats.clean_passes == 3  # ceil(9 / 4)


def mnist_test_set(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The 10,000 MNIST test images [N, 1, 28, 28] in [0, 1] and labels [N], read from the raw idx files."""
    raw = root / "MNIST" / "raw"
    images = np.fromfile(raw / "t10k-images-idx3-ubyte", dtype=np.uint8, offset=16).reshape(-1, 1, 28, 28)
    labels = np.fromfile(raw / "t10k-labels-idx1-ubyte", dtype=np.uint8, offset=8)
    return torch.from_numpy(images).float().div(255), torch.from_numpy(labels).long()


def test_real_mnist_float32_margins_with_kernels_equal_the_model_as_written(mnist_root):
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
    subspaces = DCTBlockSubspaces((1, 28, 28), 8, 1)
    auto = SubspaceDeepFool(max_iter=20)  # a few rows would crawl to 100 steps: bound the time
    stats = counted(auto)
    engine = auto(model, x, subspaces)
    if DEVICE.type == "cpu":
        assert stats.routes.get("stem", 0) > 0  # LeNet on the CPU: the stem projection and every other kernel
    off = SubspaceDeepFool(max_iter=20, kernels="off")(model, x, subspaces)
    assert engine.margins.dtype == torch.float32
    rel = (engine.margins - off.margins).abs() / off.margins
    assert rel.median() < 1e-5 and (engine.iterations == off.iterations).float().mean() > 0.95
