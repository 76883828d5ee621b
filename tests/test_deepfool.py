"""Batched subspace-constrained DeepFool against a per-sample loop, analytic margins and edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from attacks.deepfool import SubspaceDeepFool
from attacks.reference import dct_block_basis, reference_deepfool
from frequency import DCTBlockSubspaces, FullSpace, dct2, idct2
from tests.conftest import BoundedScoreModel, affine_model

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # explicit everywhere: no default-device guess
F64 = {"dtype": torch.float64, "device": DEVICE}


def small_convnet(channels: int = 1, num_classes: int = 10) -> nn.Module:
    """Built on the CPU whatever the default device (callers move it to DEVICE)."""
    torch.manual_seed(0)
    with torch.device("cpu"):
        return _convnet_layers(channels, num_classes)


def _convnet_layers(channels: int, num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.LazyLinear(32),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(32, num_classes),
    )


def prepared(model: nn.Module, shape: tuple[int, int, int]) -> nn.Module:
    model(torch.zeros(2, *shape, device="cpu"))  # materialise the lazy layer
    model.eval()
    return model.double().to(DEVICE)


@pytest.mark.parametrize("shape,block,step", [((1, 12, 12), 4, 2), ((3, 8, 8), 4, 2)])
def test_batched_engine_equals_per_sample_loop(shape, block, step):
    model = prepared(small_convnet(shape[0]), shape)
    x = torch.rand(6, *shape, **F64)
    family = DCTBlockSubspaces(shape, block, step)
    result = SubspaceDeepFool(batch_size=7)(model, x, family, return_perturbations=True)
    assert result.margins.shape == (len(family), 6)
    for s in range(len(family)):
        basis = dct_block_basis(shape, s * step, block).to(DEVICE)
        for n in range(6):  # every row: float64 engine == the release's loop to 1e-10 relative
            pert, iters, converged = reference_deepfool(model, x[n], basis)
            assert result.iterations[s, n] == iters
            assert bool(result.converged[s, n]) == converged
            np.testing.assert_allclose(result.margins[s, n].item(), pert.norm().item(), rtol=1e-10)
            scale = pert.abs().max().item()
            np.testing.assert_allclose(result.perturbations[s, n].cpu(), pert.cpu(), rtol=1e-10, atol=1e-12 * scale)


def test_full_space_default_equals_per_sample_loop_in_float32():
    shape = (1, 10, 10)
    model = small_convnet(1)
    model(torch.zeros(2, *shape, device="cpu"))
    model = model.eval().to(DEVICE)
    x = torch.rand(5, *shape, device=DEVICE)
    result = SubspaceDeepFool()(model, x)
    assert result.margins.shape == (1, 5) and result.margins.dtype == torch.float32
    for n in range(5):
        pert, iters, _ = reference_deepfool(model, x[n], None)
        np.testing.assert_allclose(result.margins[0, n].item(), pert.norm().item(), rtol=1e-4)
        assert result.iterations[0, n] == iters


def test_affine_classifier_gives_the_analytic_margin_in_one_step():
    shape, num_classes = (1, 8, 8), 12
    weight, bias = torch.randn(num_classes, 64, **F64), torch.randn(num_classes, **F64)
    model = affine_model(weight, bias)
    x = torch.rand(5, *shape, **F64)
    family = DCTBlockSubspaces(shape, 4, 2)
    result = SubspaceDeepFool()(model, x, family)
    logits = (x.flatten(1) @ weight.T + bias).cpu().numpy()
    weight = weight.cpu()
    for s in range(len(family)):
        basis = dct_block_basis(shape, 2 * s, 4).numpy()
        for n in range(5):
            order = np.argsort(-logits[n])[:10]  # top-10 candidates of 12 classes
            w = weight.numpy()[order[1:]] - weight.numpy()[order[0]]
            gaps = np.abs(logits[n, order[1:]] - logits[n, order[0]])
            analytic = 1.02 * np.min(gaps / np.linalg.norm(w @ basis, axis=1))
            np.testing.assert_allclose(result.margins[s, n].item(), analytic, rtol=1e-10)
    assert (result.iterations == 1).all() and result.converged.all()


def test_result_does_not_depend_on_batch_mates_or_chunking():
    shape = (1, 12, 12)
    model = prepared(small_convnet(1), shape)
    x = torch.rand(8, *shape, **F64)
    family = DCTBlockSubspaces(shape, 4, 4)
    together = SubspaceDeepFool(batch_size=1000)(model, x, family)
    chunked = SubspaceDeepFool(batch_size=5)(model, x, family)
    alone = SubspaceDeepFool()(model, x[3:4], family)
    for field in ("margins", "iterations", "converged"):
        torch.testing.assert_close(getattr(chunked, field), getattr(together, field), rtol=1e-10, atol=0)
        torch.testing.assert_close(getattr(alone, field)[:, 0], getattr(together, field)[:, 3], rtol=1e-10, atol=0)


def test_samples_that_cannot_flip_are_flagged_not_converged():
    shape = (1, 8, 8)
    coeffs = torch.zeros(shape, **F64)
    coeffs[0, 0, 1] = 1.0  # the only direction the model sees: a low-frequency DCT atom
    model = BoundedScoreModel(idct2(coeffs), threshold=1.5, act=torch.sin)
    x = torch.zeros(3, *shape, **F64)
    family = DCTBlockSubspaces(shape, 4, 4)  # subspace 0 contains the atom, subspace 1 is orthogonal to it
    result = SubspaceDeepFool(max_iter=7)(model, x, family)
    assert not result.converged.any()
    assert (result.iterations[0] == 7).all()  # ran out of iterations, kept its accumulated perturbation
    assert torch.isfinite(result.margins[0]).all() and (result.margins[0] > 0).all()


def test_samples_whose_projected_gradients_vanish_stop_unconverged():
    shape = (1, 8, 8)
    weight = torch.zeros(3, 64, **F64)  # constant logits: every gradient is exactly zero
    model = affine_model(weight, torch.tensor([1.0, 0.0, -1.0], **F64))
    result = SubspaceDeepFool()(model, torch.rand(2, *shape, **F64), DCTBlockSubspaces(shape, 4, 4))
    assert not result.converged.any()
    assert (result.iterations == 1).all() and (result.margins == 0).all()


def test_reachable_threshold_converges_with_few_newton_like_steps():
    shape = (1, 8, 8)
    coeffs = torch.zeros(shape, **F64)
    coeffs[0, 0, 1] = 1.0
    model = BoundedScoreModel(idct2(coeffs), threshold=0.9)
    x = torch.zeros(2, *shape, **F64)
    result = SubspaceDeepFool()(model, x, DCTBlockSubspaces(shape, 4, 4))
    assert result.converged[0].all() and (result.iterations[0] > 1).all()
    pert, iters, _ = reference_deepfool(model, x[0], dct_block_basis(shape, 0, 4).to(DEVICE))
    np.testing.assert_allclose(result.margins[0, 0].item(), pert.norm().item(), rtol=1e-10)
    assert result.iterations[0, 0] == iters
    assert dct2(torch.zeros(shape, **F64)).abs().sum() == 0


def test_model_mode_and_parameter_gradients_are_left_untouched():
    shape = (1, 12, 12)
    model = small_convnet(1)
    model(torch.zeros(2, *shape, device="cpu"))
    model = model.to(DEVICE).train()
    model[1].eval()  # a mixed state must be restored exactly
    flags = [m.training for m in model.modules()]
    running_mean = model[1].running_mean.clone()
    SubspaceDeepFool(max_iter=3)(model, torch.rand(2, *shape, device=DEVICE), DCTBlockSubspaces(shape, 4, 4))
    assert [m.training for m in model.modules()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(model[1].running_mean, running_mean)


def test_works_under_inference_mode():
    shape = (1, 10, 10)
    model = prepared(small_convnet(1), shape).float()
    x = torch.rand(3, *shape, device=DEVICE)
    expected = SubspaceDeepFool()(model, x, FullSpace(shape))
    with torch.inference_mode():
        inside = SubspaceDeepFool()(model, x.clone(), FullSpace(shape))
    torch.testing.assert_close(inside.margins, expected.margins)


def test_bad_inputs_are_rejected_clearly():
    model = prepared(small_convnet(1), (1, 12, 12))
    with pytest.raises(ValueError, match="NaN"):
        SubspaceDeepFool()(model, torch.full((1, 1, 12, 12), float("nan"), **F64))
    with pytest.raises(ValueError, match="built for images of shape"):
        SubspaceDeepFool()(model, torch.rand(1, 1, 12, 12, **F64), DCTBlockSubspaces((1, 28, 28), 8, 1))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        SubspaceDeepFool()(model, torch.rand(1, 12, 12, **F64))
