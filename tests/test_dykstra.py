"""Dykstra projection onto L2 ball ∩ (rotated) box, checked against scipy's SLSQP and a KKT bisection."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import scipy.optimize
import torch

from attacks.dykstra import (
    Projection,
    dykstra_projection,
    project_box,
    project_flipped_box,
    project_l2_ball,
)
from frequency.transforms import flip

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def _flip_matrix(shape: tuple[int, int, int]) -> np.ndarray:
    """Dense matrix of the frequency flip on flattened images, built with scipy.fft (independent of `flip`)."""
    d = int(np.prod(shape))
    cols = []
    for i in range(d):
        e = np.zeros(d)
        e[i] = 1.0
        c = scipy.fft.dctn(e.reshape(shape), axes=(-2, -1), norm="ortho")[..., ::-1, ::-1]
        cols.append(scipy.fft.idctn(c, axes=(-2, -1), norm="ortho").ravel())
    return np.stack(cols, axis=1)


def _scipy_projection(z: np.ndarray, c: np.ndarray, eps: float, flip_mat: np.ndarray | None) -> np.ndarray:
    """argmin ||u - z||^2 s.t. ||u - c|| <= eps and u in [0,1]^d (or flip_mat @ u in [0,1]^d), by SLSQP."""
    z, c = z.ravel(), c.ravel()
    constraints = [
        {"type": "ineq", "fun": lambda u: eps**2 - np.sum((u - c) ** 2), "jac": lambda u: -2.0 * (u - c)},
    ]
    bounds = None
    if flip_mat is None:
        bounds = [(0.0, 1.0)] * z.size
    else:
        constraints += [
            {"type": "ineq", "fun": lambda u: flip_mat @ u, "jac": lambda u: flip_mat},
            {"type": "ineq", "fun": lambda u: 1.0 - flip_mat @ u, "jac": lambda u: -flip_mat},
        ]
    # Feasible starts: the center, and ball-then-box (non-expansive, so it stays in the ball). SLSQP's line
    # search occasionally stalls from one start; the solution must come from a run that reports success.
    to_ball = c + (z - c) * min(1.0, eps / np.linalg.norm(z - c))
    naive = np.clip(to_ball, 0, 1) if flip_mat is None else flip_mat.T @ np.clip(flip_mat @ to_ball, 0, 1)
    messages = []
    for x0 in (c.copy(), naive):
        res = scipy.optimize.minimize(
            lambda u: np.sum((u - z) ** 2),
            x0=x0,
            jac=lambda u: 2.0 * (u - z),
            method="SLSQP",
            bounds=bounds,
            constraints=constraints,
            options={"ftol": 1e-12, "maxiter": 1000},
        )
        if res.success:
            return res.x
        messages.append(res.message)
    raise AssertionError(f"scipy reference did not converge: {messages}")


def _kkt_projection(z: torch.Tensor, c: torch.Tensor, eps: float, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """Exact projection onto ball ∩ axis-aligned box via the KKT form u(mu) = clamp((z + mu c) / (1 + mu)),
    with the multiplier mu >= 0 found by bisection (||u(mu) - c|| decreases in mu). Float64, per sample."""
    out = []
    for zi, ci in zip(z.double(), c.double()):

        def u(mu: float, zi=zi, ci=ci) -> torch.Tensor:
            return ((zi + mu * ci) / (1.0 + mu)).clamp(lo, hi)

        if (u(0.0) - ci).norm() <= eps:
            out.append(u(0.0))
            continue
        a, b = 0.0, 1.0
        while (u(b) - ci).norm() > eps:
            b *= 2.0
        for _ in range(200):
            mid = 0.5 * (a + b)
            a, b = (mid, b) if (u(mid) - ci).norm() > eps else (a, mid)
        out.append(u(b))
    return torch.stack(out)


def _problem(shape: tuple[int, ...], seed: int, flipped: bool, dtype=torch.float64, batch: int = 3):
    """Centers are valid images (in the box / rotated box); z far outside both the ball and the box."""
    g = torch.Generator().manual_seed(seed)
    c = torch.rand((batch, *shape), generator=g, dtype=torch.float64)
    if flipped:
        c = flip(c)
    d = float(np.prod(shape))
    z = c + 1.5 * torch.randn((batch, *shape), generator=g, dtype=torch.float64) * (1 + torch.rand(batch, 1, 1, 1))
    eps = 0.3 * d**0.5 * 0.5
    return z.to(dtype), c.to(dtype), eps


def _dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).norm(dim=1)


@pytest.mark.parametrize("shape", [(1, 4, 4), (3, 4, 4)])
@pytest.mark.parametrize("flipped", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_dykstra_matches_scipy(shape, flipped, seed):
    z, c, eps = _problem(shape, seed, flipped, batch=2)
    box = project_flipped_box if flipped else project_box
    out, iters, converged = dykstra_projection(z, c, eps, box, return_info=True)
    assert converged.all() and (iters < 1000).all()
    flip_mat = _flip_matrix(shape) if flipped else None
    for i in range(z.shape[0]):
        ref = _scipy_projection(z[i].numpy(), c[i].numpy(), eps, flip_mat)
        np.testing.assert_allclose(out[i].numpy().ravel(), ref, atol=1e-4)
        # optimality: the solver's point is not closer to z than ours (up to both methods' precision)
        assert _dist(out[i : i + 1], z[i : i + 1]).item() <= np.linalg.norm(ref - z[i].numpy().ravel()) + 1e-5
    assert _feasible(out, c, eps, flipped, atol=1e-9).all()


@pytest.mark.parametrize("flipped", [False, True])
def test_dykstra_beats_naive_alternating_projection(flipped):
    z, c, eps = _problem((1, 4, 4), 7, flipped)  # a draw where ball-then-box is not the projection
    box = project_flipped_box if flipped else project_box
    out = dykstra_projection(z, c, eps, box)
    naive = box(project_l2_ball(z, c, eps))
    naive_feasible = _feasible(naive, c, eps, flipped, atol=1e-6)
    strictly_farther = _dist(naive, z) > _dist(out, z) + 1e-4
    assert (~naive_feasible | strictly_farther).all()
    assert ((out - naive).flatten(1).norm(dim=1) > 1e-3).all()
    flip_mat = _flip_matrix((1, 4, 4)) if flipped else None
    ref = _scipy_projection(z[0].numpy(), c[0].numpy(), eps, flip_mat)
    np.testing.assert_allclose(out[0].numpy().ravel(), ref, atol=1e-4)


def _feasible(u: torch.Tensor, c: torch.Tensor, eps: float, flipped: bool, atol: float) -> torch.Tensor:
    in_ball = _dist(u, c) <= eps * (1 + 1e-6)
    v = flip(u) if flipped else u
    in_box = ((v >= -atol) & (v <= 1 + atol)).flatten(1).all(dim=1)
    return in_ball & in_box


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("flipped", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_dykstra_feasible_and_matches_kkt_on_mnist_sized_images(dtype, flipped, device):
    z, c, eps = _problem((1, 28, 28), 5, flipped, dtype=dtype, batch=4)
    eps = 2.0
    z, c = z.to(device), c.to(device)
    box = project_flipped_box if flipped else project_box
    out = dykstra_projection(z, c, eps, box)
    assert out.dtype == dtype and out.device == z.device
    assert _feasible(out, c, eps, flipped, atol=1e-6 if dtype == torch.float64 else 2e-6).all()
    # exact reference: solve in the rotated coordinates where the box is axis-aligned (flip is orthogonal)
    zc, cc = z.double().cpu(), c.double().cpu()
    ref = flip(_kkt_projection(flip(zc), flip(cc), eps)) if flipped else _kkt_projection(zc, cc, eps)
    torch.testing.assert_close(out.double().cpu(), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("flipped", [False, True])
def test_dykstra_idempotent_on_feasible_points(flipped):
    z, c, eps = _problem((3, 4, 4), 7, flipped)
    box = project_flipped_box if flipped else project_box
    feasible = box(project_l2_ball(z, c, eps))  # ball then box stays in the ball when c is in the box
    assert _feasible(feasible, c, eps, flipped, atol=1e-9).all()
    torch.testing.assert_close(dykstra_projection(feasible, c, eps, box), feasible, atol=1e-12, rtol=0)
    projected = dykstra_projection(z, c, eps, box)
    torch.testing.assert_close(dykstra_projection(projected, c, eps, box), projected, atol=1e-7, rtol=0)


def test_dykstra_reduces_to_single_projections_when_one_set_is_inactive():
    z, c, _ = _problem((1, 4, 4), 8, flipped=True)
    big = 1e3  # ball contains the whole box: projection onto the rotated box only
    torch.testing.assert_close(dykstra_projection(z, c, big, project_flipped_box), project_flipped_box(z))
    flip_mat = _flip_matrix((1, 4, 4))
    ref = _scipy_projection(z[0].numpy(), c[0].numpy(), big, flip_mat)
    np.testing.assert_allclose(project_flipped_box(z)[0].numpy().ravel(), ref, atol=1e-5)
    small = 1e-3  # tiny ball around a point in the box interior: ball projection only
    c_in = torch.full_like(z, 0.5)
    torch.testing.assert_close(dykstra_projection(z, c_in, small, project_box), project_l2_ball(z, c_in, small))


def test_per_sample_eps_and_batch_independence():
    z, c, _ = _problem((1, 4, 4), 9, flipped=False, batch=4)
    eps = torch.tensor([0.1, 0.5, 1.0, 3.0], dtype=torch.float64)
    batched = dykstra_projection(z, c, eps, project_box)
    for i in range(4):
        single = dykstra_projection(z[i : i + 1], c[i : i + 1], float(eps[i]), project_box)
        torch.testing.assert_close(batched[i : i + 1], single, atol=1e-12, rtol=0)
        assert _dist(batched[i : i + 1], c[i : i + 1]).item() <= eps[i].item() * (1 + 1e-6)


def test_project_l2_ball_matches_loop():
    z, c, _ = _problem((3, 4, 4), 10, flipped=False, batch=5)
    eps = torch.tensor([0.1, 1.0, 5.0, 100.0, 0.0], dtype=torch.float64)
    out = project_l2_ball(z, c, eps)
    for i in range(5):
        d = z[i] - c[i]
        expected = z[i] if d.norm() <= eps[i] else c[i] + d * eps[i] / d.norm()
        torch.testing.assert_close(out[i], expected)


def test_projection_modes_and_pluggable_box():
    z, c, eps = _problem((1, 4, 4), 11, flipped=False)
    torch.testing.assert_close(Projection("ball")(z, c, eps), project_l2_ball(z, c, eps))
    torch.testing.assert_close(Projection("ball_box")(z, c, eps), project_l2_ball(z, c, eps).clamp(0, 1))
    torch.testing.assert_close(
        Projection("ball_box", flipped=True)(flip(z), flip(c), eps),
        project_flipped_box(project_l2_ball(flip(z), flip(c), eps)),
    )
    c_mid = 0.25 + 0.5 * c  # inside the custom box [0.25, 0.75]
    custom = Projection("dykstra", box=lambda u: project_box(u, 0.25, 0.75))
    torch.testing.assert_close(custom(z, c_mid, eps), _kkt_projection(z, c_mid, eps, 0.25, 0.75), atol=1e-4, rtol=0)


def test_bad_arguments_raise():
    z, c, eps = _problem((1, 4, 4), 12, flipped=False)
    with pytest.raises(ValueError, match="projection mode"):
        Projection("exact")
    with pytest.raises(ValueError, match="eps"):
        project_l2_ball(z, c, torch.ones(2, dtype=z.dtype))
    with pytest.raises(ValueError, match="eps"):
        dykstra_projection(z, c, -1.0)
    with pytest.raises(ValueError, match="same shape"):
        dykstra_projection(z, c[:1], eps)
