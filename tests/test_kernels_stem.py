"""Gradients stopped at the first convolution (attacks/kernels/stem.py, graph.py: split_stem): the stem split computes
the model's function, its coordinates are the projected input gradients, the engine gives the reference loop's
margins with it, and input gradients wherever the shortcut would not be exact or would not pay."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attacks.deepfool import SubspaceDeepFool
from attacks.estimator import PassStats
from attacks.kernels import KERNELS, prepare_model
from attacks.kernels.graph import split_stem, trace
from attacks.kernels.stem import MAX_OUT_CHANNELS, StemProjection
from attacks.reference import dct_block_basis, reference_deepfool
from frequency import BasisSubspaces, DCTBlockSubspaces, FullSpace
from models import Normalize, NormalizedModel, build_model

F64 = {"dtype": torch.float64}
SHAPE = (1, 12, 12)
CPU = torch.device("cpu")


def lenet_like(stem_channels: int = 6, normalize: bool = True, inplace: bool = False) -> nn.Module:
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Conv2d(1, stem_channels, 5, padding=2),
        nn.ReLU(inplace=inplace),
        nn.MaxPool2d(2),
        nn.Conv2d(stem_channels, 8, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )
    model = NormalizedModel(Normalize(0.13, 0.31, SHAPE), net) if normalize else net
    return model.eval().to(**F64)


def lenet(normalize: bool = True) -> nn.Module:
    torch.manual_seed(0)
    net = build_model("lenet")
    model = NormalizedModel(Normalize(0.1307, 0.3081, (1, 28, 28)), net) if normalize else net
    return model.eval().to(**F64)


@pytest.mark.parametrize("normalize", [True, False])
def test_split_stem_finds_lenets_stem_and_the_split_computes_the_model(normalize):
    model = lenet(normalize)
    split = split_stem(trace(model))
    assert split is not None
    net = model.net if normalize else model
    assert split.conv is net.conv1  # the graph shares the model's modules
    if normalize:
        assert split.normalize is model.normalize and torch.equal(split.scale, model.normalize.std)
    else:
        assert split.normalize is None and split.scale is None
    placeholders = [n for n in split.body.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == 1 and "net.conv1" not in {n.target for n in split.body.graph.nodes}
    x = torch.rand(3, 1, 28, 28, **F64)
    with torch.no_grad():
        h = split.stem(x)
        assert h.shape == (3, 6, 28, 28)
        assert torch.equal(split.body(h), model(x))
    point = x.clone().requires_grad_(True)
    seed = torch.randn(3, 10, **F64)
    (expected,) = torch.autograd.grad(model(point), point, seed)
    (got,) = torch.autograd.grad(split.body(split.stem(point)), point, seed)
    assert torch.equal(got, expected)


def test_the_prepared_models_stem_split_computes_the_prepared_model():
    model = lenet()
    prepared = prepare_model(model, "cpu", torch.float64, "auto")
    assert prepared.stem is not None
    x = torch.rand(4, 1, 28, 28, **F64)
    with torch.no_grad():
        assert torch.equal(prepared.stem.body(prepared.stem.stem(x)), prepared(x))
        torch.testing.assert_close(prepared(x), model(x), rtol=1e-12, atol=1e-12)
    for kernels in ("off", [k for k in KERNELS if k != "stem_projection"]):
        assert prepare_model(model, "cpu", torch.float64, kernels).stem is None


class InputSkip(nn.Module):
    """Logits that also read the raw input (a skip around the stem): the stem's output is not the only path."""

    def __init__(self):
        super().__init__()
        self.body = lenet_like(normalize=False)
        self.skip = nn.Linear(12 * 12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.skip(x.flatten(1))


class StemThen(nn.Module):
    """Normalize, a 1 -> 6 stem conv, then `after(h)`; `before` applied to the normalised input."""

    def __init__(self, after, before=None, conv: nn.Module | None = None):
        super().__init__()
        torch.manual_seed(4)
        self.normalize = Normalize(0.13, 0.31, SHAPE)
        self.conv = conv if conv is not None else nn.Conv2d(1, 6, 3, padding=1)
        self.head = nn.Linear(6 * 12 * 12, 10)
        self.after, self.before = after, before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.normalize(x)
        h = self.conv(z if self.before is None else self.before(z))
        return self.head(self.after(h).flatten(1))


class StandardisedConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, (self.weight - self.weight.mean()) / self.weight.std(), self.bias)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(1, 6, 3, padding=1), nn.Linear(6 * 12 * 12, 10)

    def forward(self, x: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
        return self.head(self.conv(x + shift).flatten(1))


NO_STEM = {
    "input_skip": InputSkip,
    "in_place_relu_module": lambda: lenet_like(inplace=True),
    "in_place_functional_relu": lambda: StemThen(lambda h: F.relu(h, inplace=True)),
    "in_place_method": lambda: StemThen(lambda h: h.add_(1.0)),
    "in_place_relu_": lambda: StemThen(torch.relu_),
    "op_between_normalize_and_conv": lambda: StemThen(torch.tanh, before=lambda z: z * 2.0),
    "conv_subclass": lambda: StemThen(torch.tanh, conv=StandardisedConv(1, 6, 3, padding=1)),
    "no_conv_first": lambda: nn.Sequential(nn.Flatten(), nn.Linear(144, 10)),
    "two_inputs": TwoInputs,
}


@pytest.mark.parametrize("make", NO_STEM.values(), ids=NO_STEM.keys())
def test_no_stem_split_where_it_would_not_be_exact(make):
    model = make().eval().to(**F64)
    graph = trace(model)
    assert graph is not None and split_stem(graph) is None


def test_a_conv_output_read_out_of_place_twice_is_still_a_stem():
    model = StemThen(lambda h: torch.cat([F.relu(h), h], 1)[:, :6]).eval().to(**F64)  # many readers, none in place
    split = split_stem(trace(model))
    assert split is not None
    x = torch.rand(2, *SHAPE, **F64)
    with torch.no_grad():
        assert torch.equal(split.body(split.stem(x)), model(x))


def gradients_at_input_and_stem(model: nn.Module, x: torch.Tensor, seed: torch.Tensor):
    split = split_stem(trace(model))
    point = x.clone().requires_grad_(True)
    (grad_input,) = torch.autograd.grad(model(point), point, seed)
    h = split.stem(x).detach().requires_grad_(True)
    (grad_stem,) = torch.autograd.grad(split.body(h), h, seed)
    return split, grad_input, grad_stem


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("per_point", [False, True], ids=["rows_of_points", "one_row_per_point"])
def test_coordinates_from_the_stem_equal_the_projected_input_gradient(normalize, per_point):
    model, x = lenet_like(normalize=normalize), torch.rand(5, *SHAPE, **F64)
    family = DCTBlockSubspaces(SHAPE, 4, 2)  # 5 subspaces of dimension 16
    split, grad_input, grad_stem = gradients_at_input_and_stem(model, x, torch.randn(5, 10, **F64))
    assert (split.scale is not None) == normalize
    projection = StemProjection.build(split, family, SHAPE, torch.float64, CPU)
    assert projection is not None and projection.matrices.shape == (len(family), 6 * 12 * 12, 16)
    if per_point:  # point r is row r, subspaces out of order (the engine's pool)
        samples, rows = None, torch.tensor([3, 0, 3, 1, 4])
        sink = projection.plan(None, rows, 2)
        expected = family.coordinates(grad_input, rows)
    else:  # the shared first step: every point's rows along every subspace
        rows = torch.arange(len(family)).repeat_interleave(2)
        samples = torch.arange(len(rows)) % 5
        sink = projection.plan(samples, rows, 2)
        expected = family.coordinates(grad_input[samples], rows)
    sink.add(0, grad_stem)
    sink.add(1, 2 * grad_stem)
    got = sink.result()
    assert got.shape == (len(rows), 2, *expected.shape[1:])
    torch.testing.assert_close(got[:, 0], expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[:, 1], 2 * expected, rtol=1e-10, atol=1e-12)


def engine_and_loop(model: nn.Module, family=None, bases=None, kernels="auto", share_first_step: bool = True):
    """The engine's result on 4 images against the reference loop (1e-10), and its pass counts."""
    x = torch.rand(4, *SHAPE, **F64)
    family = family or DCTBlockSubspaces(SHAPE, 4, 2)  # 5 subspaces
    bases = bases or [dct_block_basis(SHAPE, 2 * s, 4) for s in range(len(family))]
    attack = SubspaceDeepFool(batch_size=7, kernels=kernels)
    attack.share_first_step = share_first_step
    stats = attack.observer = PassStats(attack.batch_size)
    result = attack(model, x, family)
    for s, basis in enumerate(bases):
        for n in range(len(x)):
            pert, iterations, converged = reference_deepfool(model, x[n], basis.to(**F64))
            assert result.margins[s, n].item() == pytest.approx(pert.norm().item(), rel=1e-10)
            assert result.iterations[s, n].item() == iterations and result.converged[s, n].item() == converged
    return result, stats


@pytest.mark.parametrize("share_first_step", [True, False])
def test_engine_with_stem_projection_equals_the_per_sample_loop_in_float64(share_first_step):
    result, stats = engine_and_loop(lenet_like(), share_first_step=share_first_step)
    assert (result.iterations > 1).any()
    assert stats.routes.get("stem") == stats.gradient_passes > 0  # every gradient pass stopped at the stem


def test_engine_with_stem_projection_on_dense_bases_equals_the_per_sample_loop():
    bases = [dct_block_basis(SHAPE, 2 * s, 4) for s in range(3)]
    family = BasisSubspaces([b.clone() for b in bases], SHAPE)
    _, stats = engine_and_loop(lenet_like(), family=family, bases=bases)
    assert stats.routes.get("stem") == stats.gradient_passes > 0


def test_an_in_place_relu_merged_into_its_pool_lets_the_projection_apply():
    _, stats = engine_and_loop(lenet_like(inplace=True))  # graph.py: relu + pool -> max_pool2d_relu
    assert stats.routes.get("stem") == stats.gradient_passes > 0


@pytest.mark.parametrize(
    "make,kernels",
    [
        (InputSkip, "auto"),
        (lambda: lenet_like(inplace=True), [k for k in KERNELS if k != "pool_then_relu"]),  # stays in place
        (lambda: lenet_like(stem_channels=MAX_OUT_CHANNELS + 1), "auto"),  # a wide stem: no gain
        (lenet_like, [k for k in KERNELS if k != "stem_projection"]),
        (lenet_like, "off"),
    ],
    ids=["input_skip", "in_place_relu", "wide_stem", "without_stem_projection", "off"],
)
def test_engine_falls_back_to_input_gradients_with_the_same_margins(make, kernels):
    _, stats = engine_and_loop(make().eval().to(**F64), kernels=kernels)
    assert "stem" not in stats.routes and stats.gradient_passes > 0


def test_a_subspace_too_large_for_the_stem_falls_back():
    model = lenet_like()  # 25 taps per output: m <= 100 pays
    _, stats = engine_and_loop(model, family=FullSpace(SHAPE), bases=[torch.eye(144, **F64)])  # m = 144
    assert "stem" not in stats.routes and stats.gradient_passes > 0


def test_build_returns_none_where_the_projection_does_not_apply_or_pay():
    family = DCTBlockSubspaces(SHAPE, 4, 2)

    def build(model, subspaces=family, device=CPU):
        return StemProjection.build(split_stem(trace(model)), subspaces, SHAPE, torch.float64, device)

    assert build(lenet_like(stem_channels=MAX_OUT_CHANNELS)) is not None
    assert build(lenet_like(stem_channels=MAX_OUT_CHANNELS + 1)) is None
    assert build(lenet_like(stem_channels=64)) is None  # ResNet's stem width: runs near GEMM speed already
    for device in ("cuda", "meta"):  # CPU only (no GPU needed to check)
        assert build(lenet_like(), device=torch.device(device)) is None
    unequal = BasisSubspaces([dct_block_basis(SHAPE, 0, 4), dct_block_basis(SHAPE, 4, 2)], SHAPE)
    assert build(lenet_like(), subspaces=unequal) is None


def test_the_prepared_model_builds_a_projection_once_per_family():
    prepared = prepare_model(lenet_like(), "cpu", torch.float64, "auto")
    first, second = DCTBlockSubspaces(SHAPE, 4, 2), DCTBlockSubspaces(SHAPE, 4, 4)
    projection = prepared.stem_projection(first, SHAPE)
    assert projection is not None and prepared.stem_projection(first, SHAPE) is projection
    other = prepared.stem_projection(second, SHAPE)
    assert other is not None and other is not projection and len(other.matrices) == len(second)
    assert prepared.stem_projection(FullSpace(SHAPE), SHAPE) is None
