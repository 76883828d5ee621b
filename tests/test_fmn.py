"""Subspace-constrained FMN: exact margins of linear models, perturbations inside the subspace, FMN against DeepFool
on a trained convnet, flags for rows that cannot flip, independence from batch-mates and the call's contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from attacks.deepfool import SubspaceDeepFool
from attacks.fmn import SubspaceFMN
from attacks.reference import dct_block_basis
from frequency import BasisSubspaces, DCTBlockSubspaces, FullSpace, idct2
from tests.conftest import BoundedScoreModel, affine_model

F64 = {"dtype": torch.float64}


def tiny_convnet(channels: int = 1, num_classes: int = 10) -> nn.Module:
    """Conv, batch norm, max-pool and dropout (eval mode must switch the last two off), float64, lazy layer built
    for 12x12 inputs."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(channels, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.LazyLinear(24),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(24, num_classes),
    )
    model(torch.zeros(2, channels, 12, 12))
    return model.double().eval()


def random_basis_family(shape: tuple[int, int, int], dims: list[int]) -> BasisSubspaces:
    """Subspaces spanned by random orthonormal bases of the given dimensions."""
    d = shape[0] * shape[1] * shape[2]
    return BasisSubspaces([torch.linalg.qr(torch.randn(d, m, **F64))[0] for m in dims], shape)


def dense_bases(family, shape: tuple[int, int, int]) -> list[torch.Tensor]:
    """An orthonormal basis [d, m] of every subspace, built independently of the family's own projection."""
    if isinstance(family, FullSpace):
        return [torch.eye(shape[0] * shape[1] * shape[2], **F64)]
    if isinstance(family, BasisSubspaces):
        return family.bases
    return [dct_block_basis(shape, s * family.step, family.block) for s in range(len(family))]


@pytest.mark.parametrize(
    "shape,family",
    [
        ((1, 12, 12), FullSpace((1, 12, 12))),
        ((1, 12, 12), DCTBlockSubspaces((1, 12, 12), 4, 2)),
        ((3, 8, 8), DCTBlockSubspaces((3, 8, 8), 2, 3)),
        ((1, 8, 8), None),  # random orthonormal bases of dimension 3 and 20
    ],
)
def test_linear_model_gives_the_exact_margin_along_each_subspace(shape, family):
    torch.manual_seed(1)
    family = family or random_basis_family(shape, [3, 20])
    d, num_classes = shape[0] * shape[1] * shape[2], 10
    weight, bias = torch.randn(num_classes, d, **F64), torch.randn(num_classes, **F64)
    x = torch.rand(8, *shape, **F64)
    result = SubspaceFMN()(affine_model(weight, bias), x, family, return_perturbations=True)
    logits = x.flatten(1) @ weight.T + bias
    label = logits.argmax(1)
    for s, basis in enumerate(dense_bases(family, shape)):
        for n in range(len(x)):
            w = (weight - weight[label[n]]) @ basis  # P (w_k - w_l) in basis coordinates, [K, m]
            distance = (logits[n] - logits[n, label[n]]).abs() / w.norm(dim=1)
            distance[label[n]] = torch.inf
            exact, nearest = distance.min(0)
            np.testing.assert_allclose(result.margins[s, n].item(), exact.item(), rtol=1e-6)
            direction = basis @ w[nearest] / w[nearest].norm()  # the minimiser is exact * direction
            r = result.perturbations[s, n].flatten()
            torch.testing.assert_close(r, exact * direction, rtol=0, atol=1e-6 * exact.item())
    assert result.converged.all() and (result.perturbed_labels != result.labels).all()
    assert torch.equal(result.labels, label)


@pytest.mark.parametrize(
    "shape,family",
    [
        ((1, 12, 12), DCTBlockSubspaces((1, 12, 12), 4, 2)),
        ((3, 12, 12), DCTBlockSubspaces((3, 12, 12), 6, 3)),
        ((1, 12, 12), None),  # random orthonormal bases of dimension 5 and 40
    ],
)
def test_perturbations_lie_in_the_subspace_and_flip_the_label(shape, family):
    family = family or random_basis_family(shape, [5, 40])
    model = tiny_convnet(shape[0])
    x = torch.rand(6, *shape, **F64)
    result = SubspaceFMN(steps=40)(model, x, family, return_perturbations=True)
    assert result.converged.any()
    with torch.no_grad():
        clean = model(x).argmax(1)
    for s, basis in enumerate(dense_bases(family, shape)):
        r = result.perturbations[s].flatten(1)  # [N, d]
        inside = r @ basis @ basis.T  # projection onto the subspace via an independently built basis
        assert ((r - inside).norm(dim=1) <= 1e-6 * r.norm(dim=1)).all()
        torch.testing.assert_close(r.norm(dim=1), result.margins[s], rtol=1e-12, atol=0)
        with torch.no_grad():
            labels = model(x + result.perturbations[s]).argmax(1)
        assert torch.equal(labels, result.perturbed_labels[s])
        assert torch.equal(labels != clean, result.converged[s])


def trained_mnist_convnet(root, steps: int = 300) -> tuple[nn.Module, torch.Tensor]:
    """A small convnet after `steps` SGD steps on real MNIST, and 20 test images [20, 1, 28, 28] in [0, 1]."""
    from torchvision.datasets import MNIST

    train, test = MNIST(str(root), train=True, download=False), MNIST(str(root), train=False, download=False)
    images, labels = train.data.unsqueeze(1).float() / 255.0, train.targets
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 12, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(12 * 5 * 5, 10),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        batch = torch.randint(0, len(images), (64,))
        loss = nn.functional.cross_entropy(model(images[batch] - 0.13), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    test_images = test.data[:20].unsqueeze(1).float() / 255.0
    with torch.no_grad():
        accuracy = (model(test.data[:500].unsqueeze(1).float() / 255.0 - 0.13).argmax(1) == test.targets[:500]).float()
    assert accuracy.mean() > 0.85, "the convnet did not learn; the comparison below would mean little"
    return nn.Sequential(Shift(-0.13), model), test_images


class Shift(nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.value


def test_on_a_trained_convnet_fmn_margins_are_at_most_deepfools(mnist_root):
    model, x = trained_mnist_convnet(mnist_root)
    family = DCTBlockSubspaces((1, 28, 28), 8, 1)
    fmn = SubspaceFMN()(model, x, family, return_perturbations=True)
    deepfool = SubspaceDeepFool()(model, x, family)
    both = fmn.converged & deepfool.converged
    ratio = fmn.margins[both] / deepfool.margins[both]
    larger = int((ratio > 1).sum())
    print(f"FMN / DeepFool over {int(both.sum())} rows: median {ratio.median():.3f}, larger on {larger} rows")
    assert both.float().mean() > 0.9
    assert ratio.median() <= 1.0
    assert larger <= 0.1 * ratio.numel()
    with torch.no_grad():  # every converged row really changes the label, by a perturbation of the reported norm
        flipped = model((x + fmn.perturbations).flatten(0, 1)).argmax(1).view(fmn.converged.shape)
    assert torch.equal(flipped != fmn.labels, fmn.converged)
    torch.testing.assert_close(fmn.perturbations.flatten(2).norm(dim=2), fmn.margins)
    assert ((fmn.iterations >= 1) & (fmn.iterations <= 200)).all()


def test_rows_that_cannot_flip_are_flagged_not_converged():
    shape = (1, 8, 8)
    coeffs = torch.zeros(shape, **F64)
    coeffs[0, 0, 1] = 1.0  # the only direction the model sees: a low-frequency DCT atom
    family = DCTBlockSubspaces(shape, 4, 4)  # subspace 0 contains the atom, subspace 1 is orthogonal to it
    x = torch.zeros(3, *shape, **F64)
    steps = 15
    for threshold, reachable in ((1.5, False), (0.9, True)):
        result = SubspaceFMN(steps=steps)(BoundedScoreModel(idct2(coeffs), threshold, act=torch.sin), x, family)
        assert torch.equal(result.converged[0], torch.full((3,), reachable))
        assert not result.converged[1].any()  # the projected gradient vanishes: the row never moves
        assert (result.margins[1] == 0).all() and (result.iterations[1] == steps).all()
        assert torch.equal(result.perturbed_labels != result.labels, result.converged)
    assert np.isclose(result.margins[0, 0].item(), np.arcsin(0.9), rtol=1e-6)  # sin(t) = 0.9 at |t| = asin 0.9


def test_rows_do_not_depend_on_batch_mates_and_calls_repeat_bit_for_bit():
    shape = (1, 12, 12)
    model = tiny_convnet(1)
    x = torch.rand(5, *shape, **F64)
    family = DCTBlockSubspaces(shape, 4, 2)
    attack = SubspaceFMN(steps=30, batch_size=7)
    full = attack(model, x, family, return_perturbations=True)
    again = attack(model, x, family, return_perturbations=True)
    for field in ("margins", "converged", "iterations", "perturbed_labels", "perturbations"):
        assert torch.equal(getattr(full, field), getattr(again, field))
    rows = torch.randperm(len(family) * len(x), generator=torch.Generator().manual_seed(3))[:9]
    samples, subspaces = rows % len(x), rows // len(x)  # the call's row layout: s * N + n
    part = SubspaceFMN(steps=30, batch_size=4).attack_rows(model, x, family, samples, subspaces, True)
    torch.testing.assert_close(part.margins, full.margins[subspaces, samples], rtol=1e-10, atol=0)
    torch.testing.assert_close(part.perturbations, full.perturbations[subspaces, samples], rtol=0, atol=1e-10)
    for field in ("converged", "iterations", "perturbed_labels"):
        assert torch.equal(getattr(part, field), getattr(full, field)[subspaces, samples])
    assert torch.equal(part.labels, full.labels[samples])


def test_model_modes_and_parameter_gradients_are_left_untouched():
    shape = (1, 12, 12)
    model = tiny_convnet(1)
    x = torch.rand(3, *shape, **F64)
    family = DCTBlockSubspaces(shape, 4, 4)
    expected = SubspaceFMN(steps=10)(model, x, family)  # in eval mode
    model.train()
    model[1].eval()  # a mixed state must be restored exactly
    flags = [m.training for m in model.modules()]
    running_mean = model[1].running_mean.clone()
    result = SubspaceFMN(steps=10)(model, x, family)
    assert [m.training for m in model.modules()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(model[1].running_mean, running_mean)
    assert torch.equal(result.margins, expected.margins)  # dropout and batch statistics were off


def test_dtype_casts_a_copy_and_works_under_inference_mode():
    shape = (1, 12, 12)
    model = tiny_convnet(1)
    x = torch.rand(3, *shape, **F64)
    expected = SubspaceFMN(steps=20)(model, x)
    with torch.inference_mode():
        inside = SubspaceFMN(steps=20)(model, x.clone())
    torch.testing.assert_close(inside.margins, expected.margins, rtol=1e-10, atol=0)
    single = SubspaceFMN(steps=20, dtype=torch.float32)(model, x)
    assert single.margins.dtype == torch.float32
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert torch.equal(single.converged, expected.converged)
    torch.testing.assert_close(single.margins.double(), expected.margins, rtol=1e-3, atol=0)


def test_bad_inputs_are_rejected_clearly():
    model = tiny_convnet(1)
    with pytest.raises(ValueError, match="NaN"):
        SubspaceFMN()(model, torch.full((1, 1, 12, 12), float("nan"), **F64))
    with pytest.raises(ValueError, match="built for images of shape"):
        SubspaceFMN()(model, torch.rand(1, 1, 12, 12, **F64), DCTBlockSubspaces((1, 28, 28), 8, 1))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        SubspaceFMN()(model, torch.rand(1, 12, 12, **F64))
    with pytest.raises(ValueError, match="steps"):
        SubspaceFMN(steps=0)
    with pytest.raises(ValueError, match="gamma"):
        SubspaceFMN(gamma=1.5)
    with pytest.raises(ValueError, match="dtype"):
        SubspaceFMN(dtype=torch.float16)
