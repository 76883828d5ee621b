"""Gradients stopped at the first convolution (attacks/stem_projection.py): the same margins as input gradients,
and input gradients wherever the shortcut would not be exact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attacks.deepfool import SubspaceDeepFool
from attacks.stem_projection import MAX_OUT_CHANNELS, StemProjection, StemRecorder
from frequency import DCTBlockSubspaces
from models import Normalize, NormalizedModel
from tests.deepfool_reference import dct_block_basis, reference_deepfool

F64 = {"dtype": torch.float64}
SHAPE = (1, 12, 12)


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


class InputSkip(nn.Module):
    """Logits that also read the raw input (a skip around the stem): the stem's output is not the only path."""

    def __init__(self):
        super().__init__()
        self.body = lenet_like(normalize=False)
        self.skip = nn.Linear(12 * 12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.skip(x.flatten(1))


def stem_output_and_input_gradient(model: nn.Module, x: torch.Tensor, seed: torch.Tensor):
    recorder = StemRecorder(model)
    point = x.clone().requires_grad_(True)
    recorder.start()
    logits = model(point)
    recorder.stop()
    stem = recorder.stem(point, logits)
    recorder.remove()
    (grad_input,) = torch.autograd.grad(logits, point, seed, retain_graph=True)
    grad_stem = None if stem is None else torch.autograd.grad(logits, stem.output, seed)[0]
    return stem, grad_input, grad_stem


@pytest.mark.parametrize("normalize", [True, False])
def test_coordinates_from_the_stem_equal_the_projected_input_gradient(normalize):
    model, x = lenet_like(normalize=normalize), torch.rand(5, *SHAPE, **F64)
    family = DCTBlockSubspaces(SHAPE, 4, 2)
    stem, grad_input, grad_stem = stem_output_and_input_gradient(model, x, torch.randn(5, 10, **F64))
    assert stem is not None and (stem.scale is not None) == normalize
    assert StemProjection.worthwhile(stem, family, torch.float64)
    projection = StemProjection(stem, family, SHAPE, torch.float64)
    rows = torch.arange(len(family)).repeat_interleave(2)  # rows of points 0..4 cycling through the subspaces
    samples = torch.arange(len(rows)) % 5
    sink = projection.plan(samples, rows, 1)
    sink.add(0, grad_stem)
    expected = family.coordinates(grad_input[samples], rows)
    torch.testing.assert_close(sink.result()[:, 0], expected, rtol=1e-10, atol=1e-12)


def test_no_shortcut_where_it_would_not_be_exact():
    x, seed = torch.rand(3, *SHAPE, **F64), torch.randn(3, 10, **F64)
    assert stem_output_and_input_gradient(InputSkip().to(**F64).eval(), x, seed)[0] is None  # raw-input skip
    assert stem_output_and_input_gradient(lenet_like(inplace=True), x, seed)[0] is None  # ReLU in place on h
    assert stem_output_and_input_gradient(lenet_like(), x, seed)[0] is not None


def engine_and_loop(model: nn.Module, **kwargs):
    x = torch.rand(4, *SHAPE, **F64)
    family = DCTBlockSubspaces(SHAPE, 4, 2)  # 5 subspaces
    attack = SubspaceDeepFool(batch_size=7, **kwargs)
    result = attack(model, x, family)
    for s in range(len(family)):
        basis = dct_block_basis(SHAPE, 2 * s, 4).to(**F64)
        for n in range(len(x)):
            pert, iterations, converged = reference_deepfool(model, x[n], basis)
            assert result.margins[s, n].item() == pytest.approx(pert.norm().item(), rel=1e-10)
            assert result.iterations[s, n].item() == iterations and result.converged[s, n].item() == converged
    return result, attack.last_stats


@pytest.mark.parametrize("batched_grads", [False, True])
def test_engine_with_stem_projection_equals_the_per_sample_loop_in_float64(batched_grads):
    result, stats = engine_and_loop(lenet_like(), batched_grads=batched_grads)
    assert (result.iterations > 1).any()
    assert stats.stem_passes == stats.gradient_passes > 0  # every gradient pass stopped at the stem


@pytest.mark.parametrize(
    "model,kwargs",
    [
        (InputSkip().to(**F64).eval(), {}),
        (lenet_like(inplace=True), {"fast_maxpool": False}),  # the in-place ReLU stays in place
        (lenet_like(stem_channels=MAX_OUT_CHANNELS + 1), {}),
    ],
    ids=["input_skip", "inplace_relu", "wide_stem"],
)
def test_engine_falls_back_to_input_gradients_with_the_same_margins(model, kwargs):
    _, stats = engine_and_loop(model, **kwargs)
    assert stats.stem_passes == 0 and stats.gradient_passes > 0


def test_an_inplace_relu_before_a_pool_is_made_out_of_place_and_the_projection_applies():
    _, stats = engine_and_loop(lenet_like(inplace=True))  # attacks/rewrite_graph.py: ReLU out of place
    assert stats.stem_passes == stats.gradient_passes > 0


def test_hooks_are_removed_after_the_call():
    model = lenet_like()
    SubspaceDeepFool()(model, torch.rand(2, *SHAPE, **F64), DCTBlockSubspaces(SHAPE, 4, 4))
    assert not any(m._forward_hooks for m in model.modules())
