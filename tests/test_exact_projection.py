"""The closed-form projection onto L2 ball ∩ (rotated) box, against Dykstra's algorithm, scipy and a KKT bisection.

Independent references: scipy.optimize (SLSQP finds the active constraints, `scipy.optimize.root` then solves the
KKT equations of that active set to machine precision, and the multipliers' signs certify the optimum), the KKT
form solved by bisection and the dense flip matrix from scipy.fft (tests/test_dykstra.py, never the module's own
`flip`), and Dykstra's algorithm run to a 1e-12 tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import torch

from attacks.dykstra import (
    Projection,
    dykstra_projection,
    exact_projection,
    project_box,
    project_flipped_box,
)
from tests.test_dykstra import _flip_matrix, _problem, ball_closed_form, dense_flip, kkt_flipped_or_plain

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def _dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).norm(dim=1)


def scipy_projection(z: np.ndarray, c: np.ndarray, eps: float, a: np.ndarray) -> np.ndarray:
    """argmin 0.5 ||u - z||^2 s.t. ||u - c|| <= eps and 0 <= a u <= 1 (`a`: [d, d]), to machine precision.

    SLSQP gives the active constraints (to ~1e-8); `scipy.optimize.root` solves the KKT equations with them active,
    `u - z + mu (u - c) + a_act^T s = 0, a_act u = b_act, ||u - c||^2 = eps^2`; feasibility and the multipliers'
    signs (mu >= 0, s >= 0 on upper faces, s <= 0 on lower ones) then certify the unique optimum.
    """
    d = z.size
    constraints = [
        {"type": "ineq", "fun": lambda u: eps**2 - np.sum((u - c) ** 2), "jac": lambda u: -2.0 * (u - c)},
        {"type": "ineq", "fun": lambda u: a @ u, "jac": lambda u: a},
        {"type": "ineq", "fun": lambda u: 1.0 - a @ u, "jac": lambda u: -a},
    ]
    x = c.copy()
    for _ in range(2):  # a restart from its own answer tightens SLSQP's
        x = scipy.optimize.minimize(
            lambda u: 0.5 * np.sum((u - z) ** 2),
            x0=x,
            jac=lambda u: u - z,
            method="SLSQP",
            constraints=constraints,
            options={"ftol": 1e-15, "maxiter": 1000},
        ).x
    ax = a @ x
    lower, upper = ax < 1e-6, ax > 1 - 1e-6
    ball = np.linalg.norm(x - c) > eps - 1e-6
    act = lower | upper
    rows, target = a[act], upper[act].astype(float)
    k = rows.shape[0]

    def kkt(w: np.ndarray) -> np.ndarray:
        u, s, mu = w[:d], w[d : d + k], (w[-1] if ball else 0.0)
        parts = [u - z + mu * (u - c) + rows.T @ s, rows @ u - target]
        if ball:
            parts.append([0.5 * (np.sum((u - c) ** 2) - eps**2)])
        return np.concatenate(parts)

    basis = np.concatenate([rows.T, (x - c)[:, None]], axis=1) if ball else rows.T
    multipliers = np.linalg.lstsq(basis, z - x, rcond=None)[0] if basis.shape[1] else np.zeros(0)
    sol = scipy.optimize.root(kkt, np.concatenate([x, multipliers]), method="hybr", options={"xtol": 1e-15})
    u, s = sol.x[:d], sol.x[d : d + k]
    assert np.abs(kkt(sol.x)).max() < 1e-12, "KKT equations not solved"
    assert np.linalg.norm(u - c) <= eps + 1e-12 and (a @ u >= -1e-12).all() and (a @ u <= 1 + 1e-12).all()
    assert (not ball or sol.x[-1] >= -1e-10) and (s[upper[act]] >= -1e-10).all() and (s[lower[act]] <= 1e-10).all()
    return u


@pytest.mark.parametrize("flipped", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_exact_matches_scipy_on_16_dimensions(flipped, seed):
    z, c, eps = _problem((1, 4, 4), seed, flipped, batch=2)
    out, iterations = exact_projection(z, c, eps, flipped=flipped, return_info=True)
    a = _flip_matrix((1, 4, 4)) if flipped else np.eye(16)
    for i in range(2):
        ref = scipy_projection(z[i].numpy().ravel(), c[i].numpy().ravel(), eps, a)
        np.testing.assert_allclose(out[i].numpy().ravel(), ref, atol=1e-8, rtol=0)  # measured <= 9e-16
    assert (iterations >= 1).all()


@pytest.mark.parametrize("shape", [(1, 4, 4), (3, 4, 4), (1, 28, 28), (3, 32, 32)])
@pytest.mark.parametrize("flipped", [False, True])
def test_exact_matches_dykstra_to_its_tolerance_in_float64(shape, flipped):
    """Dykstra run to tol 1e-12 (its stopping scale is `eps + ||center||`); measured <= 8e-13 of that scale."""
    z, c, eps = _problem(shape, 11, flipped, batch=3)
    exact = exact_projection(z, c, eps, flipped=flipped)
    box = project_flipped_box if flipped else project_box
    dykstra, _, converged = dykstra_projection(z, c, eps, box, max_iter=100_000, tol=1e-12, return_info=True)
    assert converged.all()
    scale = eps + c.flatten(1).norm(dim=1)
    assert (_dist(exact, dykstra) <= 1e-9 * scale).all()
    assert (_dist(exact, z) <= _dist(dykstra, z) + 1e-12).all()  # never farther from z than Dykstra's point


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("flipped", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_exact_lies_in_ball_and_box_and_matches_kkt_bisection(dtype, flipped, device):
    """Reference: the KKT bisection in float64 with the dense scipy flip; feasibility checked with that flip."""
    z, c, _ = _problem((1, 28, 28), 5, flipped, dtype=dtype, batch=4)
    eps = 2.0
    out = exact_projection(z.to(device), c.to(device), eps, flipped=flipped)
    assert out.dtype == dtype and out.device.type == device
    out, z, c = out.cpu().double(), z.double(), c.double()
    # rounding: a few units of the dtype, plus the flips' own (sums of 28 products; on CPU float32 ones in float32)
    rounding = 4 * torch.finfo(dtype).eps
    if flipped:
        rounding = 1e-13 if dtype == torch.float64 else 1e-6
    assert (_dist(out, c) <= eps * (1 + rounding)).all()  # measured excess: <= 1 unit of the dtype, float64 flip 9e-15
    pixels = dense_flip(out) if flipped else out
    assert pixels.min() >= -rounding and pixels.max() <= 1 + rounding  # measured flipped: float32 4.4e-7, float64 3e-14
    if not flipped:
        assert pixels.min() >= 0 and pixels.max() <= 1  # no flip: clamping leaves no rounding error
    ref = kkt_flipped_or_plain(z, c, eps, flipped)
    torch.testing.assert_close(
        out, ref, atol=1e-12 if dtype == torch.float64 else 1e-6, rtol=0
    )  # measured 2e-14, 1.2e-7


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("flipped", [False, True])
def test_points_already_inside_are_returned_unchanged(dtype, flipped):
    """Valid images (pixels in [0.01, 0.99], so that the flip's rounding keeps them valid) within 0.9 eps of the
    center come back bit for bit, batched with far-away points that do move."""
    g = torch.Generator().manual_seed(4)
    pixels_c = 0.01 + 0.98 * torch.rand(6, 3, 8, 8, generator=g, dtype=dtype)
    pixels_u = 0.01 + 0.98 * torch.rand(6, 3, 8, 8, generator=g, dtype=dtype)
    eps = 0.9 * _dist(pixels_u, pixels_c).max().item() / 0.9 + 1e-3  # every u within the ball...
    eps = eps / 0.9  # ...with room to spare
    to_data = (lambda u: dense_flip(u).to(dtype)) if flipped else (lambda u: u)
    c, u = to_data(pixels_c), to_data(pixels_u)
    far = c + 10 * eps * (u - c) / _dist(u, c).view(-1, 1, 1, 1)
    z = torch.cat([u[:3], far[3:]])
    out = exact_projection(z, c, eps, flipped=flipped)
    assert torch.equal(out[:3], u[:3])
    assert (_dist(out[3:], c[3:]) <= eps * (1 + 1e-6)).all() and (_dist(out[3:], far[3:]) > eps).all()
    assert torch.equal(exact_projection(c, c, eps, flipped=flipped), c)  # the center itself
    torch.testing.assert_close(exact_projection(out, c, eps, flipped=flipped), out)  # idempotent up to rounding


@pytest.mark.parametrize("flipped", [False, True])
def test_eps_zero_returns_the_center(flipped):
    z, c, _ = _problem((1, 8, 8), 9, flipped, dtype=torch.float32, batch=3)
    assert torch.equal(exact_projection(z, c, 0.0, flipped=flipped), c)
    eps = torch.tensor([0.0, 0.5, 0.0])
    out = exact_projection(z, c, eps, flipped=flipped)
    assert torch.equal(out[[0, 2]], c[[0, 2]])
    assert _dist(out[1:2], c[1:2]).item() == pytest.approx(0.5, rel=1e-6)


def test_single_constraint_cases_reduce_to_closed_forms():
    """A ball holding the whole box: the (rotated) box's projection; a tiny ball deep inside the box: the ball's."""
    z, c, _ = _problem((1, 4, 4), 8, flipped=True)
    torch.testing.assert_close(exact_projection(z, c, 1e3, flipped=True), dense_flip(dense_flip(z).clamp(0, 1)))
    c_mid = torch.full_like(z, 0.5)
    torch.testing.assert_close(exact_projection(z, c_mid, 1e-3), ball_closed_form(z, c_mid, 1e-3), atol=1e-15, rtol=0)


def test_per_sample_eps_and_batch_independence():
    z, c, _ = _problem((1, 8, 8), 10, flipped=True, batch=4)
    eps = torch.tensor([0.1, 0.5, 1.0, 3.0], dtype=torch.float64)
    batched = exact_projection(z, c, eps, flipped=True)
    for i in range(4):
        single = exact_projection(z[i : i + 1], c[i : i + 1], float(eps[i]), flipped=True)
        torch.testing.assert_close(batched[i : i + 1], single, atol=1e-15, rtol=0)


def test_root_finder_takes_few_newton_steps_on_pgd_like_steps():
    """Iterations: at most d + 1 by construction; a handful on long PGD steps from valid images (measured <= 3)."""
    g = torch.Generator().manual_seed(0)
    c = torch.rand(64, 1, 28, 28, generator=g)
    c = (c > 0.7).float() * c  # MNIST-like: most pixels exactly 0
    step = torch.randn(c.shape, generator=g)
    z = c + 2.5 * step / step.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    for flipped in (False, True):
        center = dense_flip(c).float() if flipped else c
        zz = dense_flip(z).float() if flipped else z
        _, iterations = exact_projection(zz, center, 2.0, flipped=flipped, return_info=True)
        assert iterations.max() <= 8


def test_projection_mode_exact_and_bad_arguments():
    z, c, eps = _problem((1, 4, 4), 12, flipped=True)
    torch.testing.assert_close(Projection("exact", flipped=True)(z, c, eps), kkt_flipped_or_plain(z, c, eps, True))
    assert "exact" in repr(Projection("exact"))
    with pytest.raises(ValueError, match="custom box"):
        Projection("exact", box=lambda u: u.clamp(0.25, 0.75))
    with pytest.raises(ValueError, match=r"\[B, \.\.\., H, W\]"):
        exact_projection(torch.rand(2, 5), torch.rand(2, 5), 1.0, flipped=True)
    with pytest.raises(ValueError, match="eps"):
        exact_projection(z, c, -1.0)
    with pytest.raises(ValueError, match="same shape"):
        exact_projection(z, c[:1], eps)
