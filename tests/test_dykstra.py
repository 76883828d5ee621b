"""Dykstra projection onto L2 ball ∩ (rotated) box, checked against scipy's SLSQP and a KKT bisection.

Independent references: the KKT form solved by bisection (exact to float64), scipy SLSQP, the closed-form ball
projection, and a dense flip matrix from scipy.fft (never the module's own `flip` or projections). Measured with the
default `tol=1e-6`: Dykstra vs KKT <= 7.5e-7 (float32 and float64, 28x28), vs SLSQP <= 9.6e-7.
"""

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
    """Dense matrix `[d, d]` of the frequency flip on flattened `[C, H, W]` images, independent of `flip`: per channel
    `K^T R K` with `K = D_H (x) D_W`, `D_n = scipy.fft.dct(I_n, norm="ortho")`, R the reversal permutation."""
    channels, height, width = shape
    k = np.kron(scipy.fft.dct(np.eye(height), axis=0, norm="ortho"), scipy.fft.dct(np.eye(width), axis=0, norm="ortho"))
    return np.kron(np.eye(channels), k.T @ k[::-1])


def dense_flip(u: torch.Tensor) -> torch.Tensor:
    """`u: [B, C, H, W]` flipped with the dense scipy matrix (float64 result)."""
    mat = torch.from_numpy(_flip_matrix(tuple(u.shape[1:])))
    return (u.double().flatten(1) @ mat.T).view(u.shape)


def ball_closed_form(z: torch.Tensor, c: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-sample closed form of the L2-ball projection: `c + (z - c) min(1, eps / ||z - c||)`."""
    d = (z - c).flatten(1).norm(dim=1).view(-1, *[1] * (z.dim() - 1))
    return c + (z - c) * (eps / d).clamp(max=1.0)


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


def kkt_flipped_or_plain(z: torch.Tensor, c: torch.Tensor, eps: float, flipped: bool) -> torch.Tensor:
    """Exact projection onto ball ∩ (rotated) box: the KKT bisection, in the coordinates where the box is
    axis-aligned (the dense flip matrix is orthogonal and its own inverse). Float64."""
    if not flipped:
        return _kkt_projection(z, c, eps)
    return dense_flip(_kkt_projection(dense_flip(z), dense_flip(c), eps))


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
    """References: the KKT bisection (exact) and scipy SLSQP, with the dense scipy flip matrix."""
    z, c, eps = _problem(shape, seed, flipped, batch=2)
    box = project_flipped_box if flipped else project_box
    out, iters, converged = dykstra_projection(z, c, eps, box, return_info=True)
    assert converged.all() and (iters < 1000).all()
    flip_mat = _flip_matrix(shape) if flipped else None
    torch.testing.assert_close(out, kkt_flipped_or_plain(z, c, eps, flipped), atol=2e-6, rtol=0)
    for i in range(z.shape[0]):
        ref = _scipy_projection(z[i].numpy(), c[i].numpy(), eps, flip_mat)
        np.testing.assert_allclose(out[i].numpy().ravel(), ref, atol=3e-6, rtol=0)
        # optimality: the solver's point is not closer to z than ours (up to both methods' precision)
        assert _dist(out[i : i + 1], z[i : i + 1]).item() <= np.linalg.norm(ref - z[i].numpy().ravel()) + 2e-6
    assert _feasible(out, c, eps, flipped, atol=1e-9).all()


@pytest.mark.parametrize("flipped", [False, True])
def test_dykstra_beats_naive_alternating_projection(flipped):
    """Reference: scipy SLSQP; the naive ball-then-box point is infeasible or strictly farther from z."""
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
    np.testing.assert_allclose(out[0].numpy().ravel(), ref, atol=3e-6, rtol=0)


def _feasible(u: torch.Tensor, c: torch.Tensor, eps: float, flipped: bool, atol: float) -> torch.Tensor:
    """In the ball (relative 1e-6) and, after the dense scipy flip when `flipped`, in [0, 1] up to `atol`."""
    in_ball = _dist(u, c) <= eps * (1 + 1e-6)
    v = dense_flip(u) if flipped else u
    in_box = ((v >= -atol) & (v <= 1 + atol)).flatten(1).all(dim=1)
    return in_ball & in_box


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("flipped", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_dykstra_feasible_and_matches_kkt_on_mnist_sized_images(dtype, flipped, device):
    """Reference: the KKT bisection in float64 (dense scipy flip); measured <= 7.5e-7 with tol=1e-6."""
    z, c, eps = _problem((1, 28, 28), 5, flipped, dtype=dtype, batch=4)
    eps = 2.0
    z, c = z.to(device), c.to(device)
    box = project_flipped_box if flipped else project_box
    out = dykstra_projection(z, c, eps, box)
    assert out.dtype == dtype and out.device == z.device
    assert _feasible(out, c, eps, flipped, atol=1e-6 if dtype == torch.float64 else 2e-6).all()
    # exact reference: KKT bisection in the rotated coordinates where the box is axis-aligned (dense scipy flip)
    ref = kkt_flipped_or_plain(z.double().cpu(), c.double().cpu(), eps, flipped)
    torch.testing.assert_close(out.double().cpu(), ref, atol=2e-6, rtol=0)


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
    """References: the rotated box's closed form with the dense scipy flip, scipy SLSQP, the ball's closed form."""
    big = 1e3  # ball contains the whole box: projection onto the rotated box only
    rotated_box = dense_flip(dense_flip(z).clamp(0, 1))
    torch.testing.assert_close(dykstra_projection(z, c, big, project_flipped_box), rotated_box, atol=1e-14, rtol=0)
    ref = _scipy_projection(z[0].numpy(), c[0].numpy(), big, _flip_matrix((1, 4, 4)))
    np.testing.assert_allclose(rotated_box[0].numpy().ravel(), ref, atol=3e-6, rtol=0)
    small = 1e-3  # tiny ball around a point in the box interior: ball projection only
    c_in = torch.full_like(z, 0.5)
    expected = ball_closed_form(z, c_in, small)
    torch.testing.assert_close(dykstra_projection(z, c_in, small, project_box), expected, atol=1e-15, rtol=0)


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
    """References: the ball's closed form, clamping, the dense scipy flip, and the KKT bisection."""
    z, c, eps = _problem((1, 4, 4), 11, flipped=False)
    ball = ball_closed_form(z, c, eps)
    torch.testing.assert_close(Projection("ball")(z, c, eps), ball, atol=1e-15, rtol=0)
    torch.testing.assert_close(Projection("ball_box")(z, c, eps), ball.clamp(0, 1), atol=1e-15, rtol=0)
    zf, cf = dense_flip(z), dense_flip(c)
    naive_flipped = dense_flip(dense_flip(ball_closed_form(zf, cf, eps)).clamp(0, 1))
    torch.testing.assert_close(Projection("ball_box", flipped=True)(zf, cf, eps), naive_flipped, atol=1e-14, rtol=0)
    c_mid = 0.25 + 0.5 * c  # inside the custom box [0.25, 0.75]
    custom = Projection("dykstra", box=lambda u: project_box(u, 0.25, 0.75))
    torch.testing.assert_close(custom(z, c_mid, eps), _kkt_projection(z, c_mid, eps, 0.25, 0.75), atol=2e-6, rtol=0)


def test_bad_arguments_raise():
    z, c, eps = _problem((1, 4, 4), 12, flipped=False)
    with pytest.raises(ValueError, match="projection mode"):
        Projection("linf")
    with pytest.raises(ValueError, match="eps"):
        project_l2_ball(z, c, torch.ones(2, dtype=z.dtype))
    with pytest.raises(ValueError, match="eps"):
        dykstra_projection(z, c, -1.0)
    with pytest.raises(ValueError, match="same shape"):
        dykstra_projection(z, c[:1], eps)
